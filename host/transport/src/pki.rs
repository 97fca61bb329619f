//! The cluster's certificate authority and the identities it vouches for.
//!
//! Every certificate the CA issues names exactly one [`Identity`] as a URI in
//! its subject alternative names, so that a peer's identity is read from the
//! certificate TLS has already verified, never from anything the peer says:
//!
//! | identity | SAN URI | other SANs | extended key usage |
//! | --- | --- | --- | --- |
//! | node 3 | `kythira://node/3` | DNS `kythira` ([`SERVER_NAME`]), the IPs given | server and client auth |
//! | client `alice`, role admin | `kythira://client/alice?role=admin` | — | client auth |
//!
//! The encoding is canonical: node ids are decimal without sign or leading
//! zeros, client names are 1–64 characters of `[A-Za-z0-9._-]`, and the only
//! query is `role=admin` or `role=client`. Anything else under the `kythira`
//! scheme is an error rather than ignored, so a certificate cannot carry two
//! readings. Node certificates carry the DNS name [`SERVER_NAME`], which is
//! the name every dialer verifies (see `tls`); client certificates do not, and
//! lack the server-auth usage, so a client certificate cannot pose as a node.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use time::{Duration as TimeDuration, OffsetDateTime};
use x509_parser::extensions::GeneralName;

/// The DNS name in every node certificate and the server name every dialer
/// verifies. A fixed name, rather than the peer's address, lets a node move or
/// sit behind NAT without a new certificate; who the server *is* comes from
/// its identity URI, which callers check after the handshake.
pub const SERVER_NAME: &str = "kythira";

/// URI scheme of identity SANs.
const SCHEME: &str = "kythira://";
/// Longest client name accepted.
pub const MAX_CLIENT_NAME: usize = 64;
/// How far back a new certificate's validity starts, to tolerate clock skew
/// between the machine that issues it and the ones that check it.
const BACKDATE: TimeDuration = TimeDuration::days(1);
/// Validity of the CA and of issued certificates. Rotation is an operator's
/// job; ten years keeps a test cluster from expiring under anybody.
const VALIDITY: TimeDuration = TimeDuration::days(3650);

/// Errors of certificate generation, parsing and files.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused to generate or sign.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A DER certificate did not parse.
    #[error("certificate does not parse: {reason}")]
    Parse {
        /// Parser's message.
        reason: String,
    },
    /// The certificate names no Kythira identity.
    #[error("certificate carries no kythira:// identity URI")]
    NoIdentity,
    /// The certificate names more than one Kythira identity.
    #[error("certificate carries {count} kythira:// identity URIs; exactly one is allowed")]
    MultipleIdentities {
        /// How many it carries.
        count: usize,
    },
    /// A `kythira://` URI that is not a canonical identity.
    #[error("invalid identity URI {uri:?}: {reason}")]
    BadIdentityUri {
        /// The URI as found.
        uri: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Node id 0 means "nobody" in the core.
    #[error("node id 0 is reserved; node ids start at 1")]
    InvalidNodeId,
    /// A client name outside the allowed alphabet or length.
    #[error(
        "invalid client name {name:?}: use 1 to {MAX_CLIENT_NAME} characters of A-Z a-z 0-9 . _ -"
    )]
    InvalidClientName {
        /// The name given.
        name: String,
    },
    /// A role other than `admin` or `client`.
    #[error("invalid role {role:?}: expected admin or client")]
    InvalidRole {
        /// The role given.
        role: String,
    },
    /// The CA key does not belong to the CA certificate.
    #[error("the CA key does not match the CA certificate")]
    CaKeyMismatch,
    /// The CA certificate is not marked as a CA.
    #[error("the certificate is not a CA certificate (basic constraints)")]
    NotCa,
    /// Writing or reading a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// What a client may do. Authorization is the API layer's business; the
/// transport only carries the role from the certificate to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May deploy plugins and operate the cluster.
    Admin,
    /// May apply commands and query.
    Client,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Client => "client",
        })
    }
}

impl FromStr for Role {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "client" => Ok(Role::Client),
            _ => Err(PkiError::InvalidRole { role: s.to_owned() }),
        }
    }
}

/// Who holds a certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Identity {
    /// A cluster member; the id is at least 1.
    Node(u64),
    /// An application or operator.
    Client {
        /// Name, see [`MAX_CLIENT_NAME`] for the alphabet.
        name: String,
        /// What it may do.
        role: Role,
    },
}

impl Identity {
    /// A client identity with a checked name.
    pub fn client(name: impl Into<String>, role: Role) -> Result<Self, PkiError> {
        let name = name.into();
        check_client_name(&name)?;
        Ok(Identity::Client { name, role })
    }

    /// The node id, if this is a node.
    pub fn node_id(&self) -> Option<u64> {
        match self {
            Identity::Node(id) => Some(*id),
            Identity::Client { .. } => None,
        }
    }

    /// Checks the invariants a constructed value may have broken (id 0, bad
    /// name), so that nothing unparseable is ever written into a certificate.
    pub fn validate(&self) -> Result<(), PkiError> {
        match self {
            Identity::Node(0) => Err(PkiError::InvalidNodeId),
            Identity::Node(_) => Ok(()),
            Identity::Client { name, .. } => check_client_name(name),
        }
    }

    /// The SAN URI that encodes this identity.
    pub fn to_uri(&self) -> String {
        match self {
            Identity::Node(id) => format!("{SCHEME}node/{id}"),
            Identity::Client { name, role } => format!("{SCHEME}client/{name}?role={role}"),
        }
    }

    /// Parses a SAN URI; only the canonical form is accepted.
    pub fn from_uri(uri: &str) -> Result<Self, PkiError> {
        let bad = |reason| PkiError::BadIdentityUri {
            uri: uri.to_owned(),
            reason,
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("not a kythira:// URI"))?;
        if let Some(id) = rest.strip_prefix("node/") {
            // `u64::from_str` accepts "+3" and "03"; one identity must have
            // one spelling, so require the canonical decimal form.
            let parsed: u64 = id.parse().map_err(|_| bad("node id is not a number"))?;
            if parsed.to_string() != id {
                return Err(bad("node id is not in canonical decimal form"));
            }
            if parsed == 0 {
                return Err(PkiError::InvalidNodeId);
            }
            return Ok(Identity::Node(parsed));
        }
        if let Some(rest) = rest.strip_prefix("client/") {
            let (name, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("client URI lacks ?role="))?;
            let role = query
                .strip_prefix("role=")
                .ok_or_else(|| bad("client URI query must be role=admin|client"))?;
            let role = role
                .parse()
                .map_err(|_| bad("role must be admin or client"))?;
            check_client_name(name).map_err(|_| bad("invalid client name"))?;
            return Ok(Identity::Client {
                name: name.to_owned(),
                role,
            });
        }
        Err(bad(
            "expected kythira://node/<id> or kythira://client/<name>?role=<role>",
        ))
    }

    /// Reads the identity out of a DER certificate: exactly one `kythira://`
    /// URI SAN, canonical. Does not check the signature; TLS has done that
    /// before anyone calls this on a peer's certificate.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, PkiError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse {
            reason: e.to_string(),
        })?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| PkiError::Parse {
                reason: e.to_string(),
            })?;
        let uris: Vec<&str> = san
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with(SCHEME) => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [] => Err(PkiError::NoIdentity),
            [uri] => Identity::from_uri(uri),
            more => Err(PkiError::MultipleIdentities { count: more.len() }),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(id) => write!(f, "node {id}"),
            Identity::Client { name, role } => write!(f, "client {name} ({role})"),
        }
    }
}

impl FromStr for Identity {
    type Err = PkiError;
    /// Parses the SAN URI form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Identity::from_uri(s)
    }
}

fn check_client_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CLIENT_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidClientName {
            name: name.to_owned(),
        })
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// The PKCS#8 private key. Secret.
    pub key_pem: String,
}

impl IssuedCert {
    /// Writes the certificate (mode as umask allows) and the key (mode 0600).
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_public_file(cert_path, &self.cert_pem)?;
        write_secret_file(key_path, &self.key_pem)
    }
}

/// The cluster's certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA with an ECDSA P-256 key.
    pub fn generate() -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Kythira cluster CA");
        params.distinguished_name = dn;
        // Path length 0: the CA signs leaves only, so a leaked leaf key can
        // never mint further certificates.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Reloads a CA written by [`Ca::to_pem`]; checks that the key belongs to
    /// the certificate and that the certificate is a CA.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(
            |e| PkiError::Parse {
                reason: format!("CA certificate PEM: {e}"),
            },
        )?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::Parse {
            reason: e.to_string(),
        })?;
        if !x509.is_ca() {
            return Err(PkiError::NotCa);
        }
        use rcgen::PublicKeyData;
        if x509.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
            return Err(PkiError::CaKeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&der, key)?;
        Ok(Ca {
            issuer,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// The CA certificate and key as PEM.
    pub fn to_pem(&self) -> IssuedCert {
        IssuedCert {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.issuer.key().serialize_pem(),
        }
    }

    /// The CA certificate as PEM (what every node and client trusts).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `identity`. Node certificates carry `ips` as IP
    /// SANs and [`SERVER_NAME`] as a DNS SAN; `ips` is ignored for clients.
    pub fn issue(&self, identity: &Identity, ips: &[IpAddr]) -> Result<IssuedCert, PkiError> {
        identity.validate()?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.to_string());
        params.distinguished_name = dn;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.subject_alt_names = vec![SanType::URI(identity.to_uri().try_into()?)];
        match identity {
            Identity::Node(_) => {
                params
                    .subject_alt_names
                    .push(SanType::DnsName(SERVER_NAME.try_into()?));
                params
                    .subject_alt_names
                    .extend(ips.iter().copied().map(SanType::IpAddress));
                // Nodes both accept (server) and dial (client) each other.
                params.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
            }
            Identity::Client { .. } => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        set_validity(&mut params);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes the CA certificate and (mode 0600) key.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        self.to_pem().write(cert_path, key_path)
    }

    /// Reads a CA written by [`Ca::write`].
    pub fn read(cert_path: &Path, key_path: &Path) -> Result<Ca, PkiError> {
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|source| PkiError::Io {
                path: path.to_owned(),
                source,
            })
        };
        Ca::from_pem(&read(cert_path)?, &read(key_path)?)
    }
}

fn set_validity(params: &mut CertificateParams) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + VALIDITY;
}

/// Writes a file that anybody may read.
pub fn write_public_file(path: &Path, contents: &str) -> Result<(), PkiError> {
    fs::write(path, contents).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes a private key file readable by its owner only (0600), also when a
/// file with wider permissions was there before.
pub fn write_secret_file(path: &Path, contents: &str) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let mut file = options.open(path).map_err(io)?;
        // `mode` applies only to a file created now; narrow an existing one
        // before the secret is written into it.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io)?;
        file.write_all(contents.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)
    }
    #[cfg(not(unix))]
    {
        let mut file = options.open(path).map_err(io)?;
        file.write_all(contents.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::CertificateDer;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn identities_roundtrip_through_certificates() {
        let ca = Ca::generate().unwrap();
        for identity in [
            Identity::Node(1),
            Identity::Node(u64::MAX),
            Identity::client("alice", Role::Admin).unwrap(),
            Identity::client("app-1.prod_x", Role::Client).unwrap(),
        ] {
            let issued = ca
                .issue(&identity, &["127.0.0.1".parse().unwrap()])
                .unwrap();
            assert_eq!(
                Identity::from_cert_der(&der(&issued.cert_pem)).unwrap(),
                identity
            );
        }
    }

    #[test]
    fn uris_are_canonical() {
        assert_eq!(Identity::Node(3).to_uri(), "kythira://node/3");
        assert_eq!(
            Identity::client("bob", Role::Admin).unwrap().to_uri(),
            "kythira://client/bob?role=admin"
        );
        for bad in [
            "kythira://node/0",
            "kythira://node/03",
            "kythira://node/+3",
            "kythira://node/",
            "kythira://node/3/x",
            "kythira://client/bob",
            "kythira://client/bob?role=root",
            "kythira://client/?role=admin",
            "kythira://client/b%20b?role=admin",
            "kythira://client/bob?role=admin&x=1",
            "kythira://other/1",
            "https://node/1",
        ] {
            assert!(Identity::from_uri(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn invalid_identities_are_not_issued() {
        let ca = Ca::generate().unwrap();
        assert!(matches!(
            ca.issue(&Identity::Node(0), &[]),
            Err(PkiError::InvalidNodeId)
        ));
        let bad = Identity::Client {
            name: "a b".into(),
            role: Role::Client,
        };
        assert!(matches!(
            ca.issue(&bad, &[]),
            Err(PkiError::InvalidClientName { .. })
        ));
        assert!(Identity::client("x".repeat(65), Role::Client).is_err());
    }

    #[test]
    fn certificate_without_identity_is_an_error() {
        let plain = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        assert!(matches!(
            Identity::from_cert_der(plain.cert.der()),
            Err(PkiError::NoIdentity)
        ));
        assert!(Identity::from_cert_der(b"garbage").is_err());
    }

    #[test]
    fn two_identities_are_an_error() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI("kythira://node/1".try_into().unwrap()),
            SanType::URI("kythira://node/2".try_into().unwrap()),
        ];
        let cert = params.self_signed(&key).unwrap();
        assert!(matches!(
            Identity::from_cert_der(cert.der()),
            Err(PkiError::MultipleIdentities { count: 2 })
        ));
    }

    #[test]
    fn ca_reloads_from_pem_and_keeps_signing() {
        let ca = Ca::generate().unwrap();
        let pem = ca.to_pem();
        let again = Ca::from_pem(&pem.cert_pem, &pem.key_pem).unwrap();
        let issued = again.issue(&Identity::Node(2), &[]).unwrap();
        assert_eq!(
            Identity::from_cert_der(&der(&issued.cert_pem)).unwrap(),
            Identity::Node(2)
        );
        let other = Ca::generate().unwrap().to_pem();
        assert!(matches!(
            Ca::from_pem(&pem.cert_pem, &other.key_pem),
            Err(PkiError::CaKeyMismatch)
        ));
        assert!(matches!(
            Ca::from_pem(&issued.cert_pem, &issued.key_pem),
            Err(PkiError::NotCa)
        ));
    }

    #[test]
    fn role_and_identity_parse_and_display() {
        assert_eq!("admin".parse::<Role>().unwrap(), Role::Admin);
        assert_eq!(Role::Client.to_string(), "client");
        assert!("Admin".parse::<Role>().is_err());
        let id: Identity = "kythira://node/7".parse().unwrap();
        assert_eq!(id, Identity::Node(7));
        assert_eq!(id.to_string(), "node 7");
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate().unwrap();
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        fs::write(&key, "old").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        ca.write(&cert, &key).unwrap();
        let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = Ca::read(&cert, &key).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
    }
}
