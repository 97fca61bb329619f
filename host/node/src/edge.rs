//! JSON at the edge: commands, queries and answers that clients send as JSON
//! are translated by the machine's own plugin, on a fresh instance outside
//! the log, so the log and the replicated instance only ever see the
//! plugin's binary encoding.

use bytes::Bytes;
use kythira_api::{ApiError, Payload};
use kythira_runtime::CallError;

use crate::machines::PluginInfo;
use crate::node::NodeHandle;

/// Which translation a payload needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translate {
    /// JSON command to bytes.
    Command,
    /// JSON query to bytes.
    Query,
    /// Bytes of an apply answer to JSON.
    Response,
    /// Bytes of a query answer to JSON.
    QueryResponse,
}

impl NodeHandle {
    fn plugin_of(&self, machine: &str) -> Result<PluginInfo, ApiError> {
        self.shared()
            .plugins
            .lock()
            .expect("lock")
            .get(machine)
            .cloned()
            .ok_or_else(|| ApiError::UnknownMachine(machine.to_string()))
    }

    /// The plugin's binary form of `payload`.
    pub(crate) async fn to_bytes(
        &self,
        machine: &str,
        payload: Payload,
        direction: Translate,
    ) -> Result<Bytes, ApiError> {
        match payload {
            Payload::Bytes(b) => Ok(b),
            Payload::Json(json) => {
                let info = self.plugin_of(machine)?;
                let _slot = self.translations.acquire().await.map_err(|_| stopped())?;
                tokio::task::spawn_blocking(move || translate_in(&info, direction, json))
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?
            }
        }
    }

    /// The JSON form of an answer in the plugin's binary form.
    pub(crate) async fn to_json(
        &self,
        machine: &str,
        payload: Payload,
        direction: Translate,
    ) -> Result<Payload, ApiError> {
        match payload {
            Payload::Json(j) => Ok(Payload::Json(j)),
            Payload::Bytes(b) => {
                let info = self.plugin_of(machine)?;
                let _slot = self.translations.acquire().await.map_err(|_| stopped())?;
                tokio::task::spawn_blocking(move || translate_out(&info, direction, &b))
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?
                    .map(Payload::Json)
            }
        }
    }
}

pub(crate) fn translate_in(
    info: &PluginInfo,
    direction: Translate,
    json: String,
) -> Result<Bytes, ApiError> {
    let outcome = match direction {
        Translate::Command => info.runtime.command_from_json(&info.plugin, &json),
        Translate::Query => info.runtime.query_from_json(&info.plugin, &json),
        Translate::Response | Translate::QueryResponse => {
            unreachable!("answers are translated out, not in")
        }
    };
    outcome.result.map(Bytes::from).map_err(refused)
}

pub(crate) fn translate_out(
    info: &PluginInfo,
    direction: Translate,
    bytes: &[u8],
) -> Result<String, ApiError> {
    let outcome = match direction {
        Translate::Response => info.runtime.response_to_json(&info.plugin, bytes),
        Translate::QueryResponse => info.runtime.query_response_to_json(&info.plugin, bytes),
        Translate::Command | Translate::Query => {
            unreachable!("requests are translated in, not out")
        }
    };
    outcome.result.map_err(refused)
}

/// The plugin's refusal of a JSON request is the client's mistake; anything
/// else is the plugin's failure.
fn refused(err: CallError) -> ApiError {
    match err {
        CallError::Plugin(why) => ApiError::BadRequest(why),
        // No instance to be had right now: worth a retry.
        CallError::Internal(why) => ApiError::Unavailable(format!("while translating JSON: {why}")),
        other => ApiError::Plugin(format!("while translating JSON: {other}")),
    }
}

fn stopped() -> ApiError {
    ApiError::Unavailable("the node is shutting down".into())
}
