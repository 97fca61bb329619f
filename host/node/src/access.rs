//! Who may ask what: the role in the caller's certificate against the
//! request. `admin` certificates deploy code, change the membership and move
//! leadership; `client` certificates apply commands and query. A refusal
//! names the role that is needed, so the operator knows which certificate to
//! use.

use kythira_api::{ApiError, Request};

use crate::node::Caller;

/// The role's name as certificates carry it (`?role=…`).
pub fn role_name(caller: Caller) -> &'static str {
    match caller {
        Caller::Admin => "admin",
        Caller::Client => "client",
    }
}

/// Whether `caller` may send `request`; the refusal names the role needed.
pub fn authorize(caller: Caller, request: &Request) -> Result<(), ApiError> {
    match request.admin_action() {
        Some(action) if caller != Caller::Admin => Err(ApiError::Unauthorized(format!(
            "{action} needs a certificate with the `admin` role; this one has the `{}` role",
            role_name(caller)
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kythira_api::{Consistency, DeployLimits, Payload};

    fn requests() -> Vec<Request> {
        vec![
            Request::Deploy {
                machine: "kv".into(),
                component: Bytes::new(),
                limits: DeployLimits::default(),
            },
            Request::AddLearner {
                id: 4,
                peer: "127.0.0.1:1".into(),
                client: "127.0.0.1:2".into(),
            },
            Request::Promote { id: 4 },
            Request::RemoveMember { id: 2 },
            Request::TransferLeadership { to: 3 },
            Request::Apply {
                machine: "kv".into(),
                command: Payload::Json("{}".into()),
                session: None,
            },
            Request::Query {
                machine: "kv".into(),
                query: Payload::Json("{}".into()),
                consistency: Consistency::Linearizable,
            },
            Request::RegisterSession,
            Request::Members,
            Request::Status,
        ]
    }

    #[test]
    fn admins_may_do_everything() {
        for r in requests() {
            assert_eq!(authorize(Caller::Admin, &r), Ok(()), "{r:?}");
        }
    }

    #[test]
    fn clients_may_read_and_write_and_are_told_which_role_the_rest_needs() {
        let refused: Vec<String> = requests()
            .iter()
            .filter_map(|r| authorize(Caller::Client, r).err())
            .map(|e| e.to_string())
            .collect();
        assert_eq!(refused.len(), 5, "{refused:#?}");
        for e in &refused {
            assert!(
                e.contains("the `admin` role") && e.contains("has the `client` role"),
                "{e}"
            );
        }
        assert!(refused[0].contains("deploying code"));
        assert!(refused[1].contains("changing the membership"));
        assert!(refused[4].contains("transferring leadership"));
    }
}
