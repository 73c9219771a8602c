//! TLS between nodes (docs/DESIGN-NOTES.md, "Encrypted between hosts").
//!
//! A cluster that names a certificate folder (`[tls] dir` in the cluster
//! file, or `PYGMY_TLS_DIR`) speaks TLS 1.3/1.2 (rustls, ring) between its
//! nodes: every node's port takes TLS with a client certificate from the
//! cluster's own CA, beside plain HTTP for the public routes; internal and
//! admin routes are refused unless they arrive over TLS with such a
//! certificate, so the cluster token and the replication traffic never cross
//! the network in clear text. `pygmy certs` makes the CA and one certificate
//! per node (and one for the operator's CLI).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ClusterConfig;

/// The name of the certificate the CLI presents.
pub const OPERATOR: &str = "operator";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// What a process needs to speak TLS with its cluster: its server side
/// (asks for a client certificate, accepts none for public routes) and its
/// client side (trusts only the cluster CA, presents its own certificate).
#[derive(Clone)]
pub struct Material {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

static INSTALLED: std::sync::OnceLock<Material> = std::sync::OnceLock::new();

/// Makes `material` this process's TLS: its server accepts TLS, and every
/// [`crate::client::Http`] made afterwards speaks it. A process belongs to
/// one cluster, so the first call wins.
pub fn install(material: Material) {
    let _ = INSTALLED.set(material);
}

/// This process's TLS, if [`install`]ed.
pub fn installed() -> Option<&'static Material> {
    INSTALLED.get()
}

/// Makes ring this process's default rustls provider (the HTTP client
/// needs one even for plain HTTP); once.
pub fn default_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The client side of a process without TLS: it trusts no certificate
/// (the nodes speak https only with their cluster's CA), so nothing is
/// looked up in the system's certificate store (images have none).
pub fn no_roots_client() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read {
            path: path.to_path_buf(),
            why: format!("not PEM certificates: {e:?}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Read {
            path: path.to_path_buf(),
            why: "no certificate in it".into(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        why: format!("not a PEM private key: {e:?}"),
    })
}

/// Loads `dir/ca.pem` and `dir/NAME.pem` + `dir/NAME.key` (`name`: a node,
/// or [`OPERATOR`] for the CLI).
pub fn load(dir: &Path, name: &str) -> Result<Material, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs(&dir.join("ca.pem"))? {
        roots
            .add(ca)
            .map_err(|e| TlsError::Setup(format!("cluster CA: {e}")))?;
    }
    let roots = Arc::new(roots);
    let chain = certs(&dir.join(format!("{name}.pem")))?;
    let key_path = dir.join(format!("{name}.key"));
    let setup = |e: rustls::Error| TlsError::Setup(e.to_string());

    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Setup(format!("client verifier: {e}")))?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(setup)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key(&key_path)?)
        .map_err(setup)?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];

    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(setup)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key(&key_path)?)
        .map_err(setup)?;
    Ok(Material {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

/// The certificate folder `cfg` names, if any.
pub fn dir_of(cfg: &ClusterConfig) -> Option<PathBuf> {
    cfg.tls.as_ref().map(|t| cfg.resolve(&t.dir))
}

/// Makes `out/ca.pem` + `ca.key` (a new cluster CA) and, signed by it, a
/// certificate and key per node of `cfg` and one for the operator's CLI.
/// Each node's certificate names its host, its node name, `localhost` and
/// 127.0.0.1. A folder that already holds a CA is left as it is (so the
/// command can run before every start); returns the files written.
pub fn generate(cfg: &ClusterConfig, out: &Path) -> Result<Vec<PathBuf>, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    if out.join("ca.pem").exists() {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(out).map_err(|source| TlsError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let rc = |e: rcgen::Error| TlsError::Setup(e.to_string());
    let year = 1970
        + (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            / 31_556_952) as i32;
    let validity = |p: &mut CertificateParams| {
        p.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
        p.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    };

    let ca_key = KeyPair::generate().map_err(rc)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("pygmy cluster {} CA", cfg.cluster_id),
    );
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key).map_err(rc)?;
    let issuer = Issuer::new(ca, &ca_key);

    let mut written = Vec::new();
    let mut write = |name: &str, text: &str, secret: bool| -> Result<(), TlsError> {
        let path = out.join(name);
        write_file(&path, text.as_bytes(), secret)?;
        written.push(path);
        Ok(())
    };
    write("ca.pem", &ca_cert.pem(), false)?;
    write("ca.key", &ca_key.serialize_pem(), true)?;

    let mut names: Vec<(String, Vec<String>)> = cfg
        .nodes
        .iter()
        .map(|n| {
            let mut sans = vec![n.name.clone(), "localhost".into(), "127.0.0.1".into()];
            for a in std::iter::once(&n.addr).chain(n.listen.as_ref()) {
                if let Some((host, _)) = a.rsplit_once(':') {
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    if !host.is_empty() && host != "0.0.0.0" && host != "::" {
                        sans.push(host.to_string());
                    }
                }
            }
            sans.sort();
            sans.dedup();
            (n.name.clone(), sans)
        })
        .collect();
    names.push((OPERATOR.to_string(), vec![OPERATOR.to_string()]));
    for (name, sans) in names {
        let key = KeyPair::generate().map_err(rc)?;
        let mut p = CertificateParams::new(sans).map_err(rc)?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name.clone());
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p);
        let cert = p.signed_by(&key, &issuer).map_err(rc)?;
        write(
            &format!("{name}.pem"),
            &(cert.pem() + &ca_cert.pem()),
            false,
        )?;
        write(&format!("{name}.key"), &key.serialize_pem(), true)?;
    }
    Ok(written)
}

/// Writes `bytes` to `path`; `secret` files are readable by their owner only.
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_chain_to_the_cluster_ca_and_name_their_node() {
        use rustls::client::danger::ServerCertVerifier;
        let cfg = ClusterConfig::local("127.0.0.7", 3);
        let dir =
            std::env::temp_dir().join(format!("pygmy-certs-{}", uuid::Uuid::new_v4().simple()));
        let files = generate(&cfg, &dir).unwrap();
        assert!(files.iter().any(|f| f.ends_with("catalog-2.key")));
        assert!(
            generate(&cfg, &dir).unwrap().is_empty(),
            "an existing CA is kept"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("catalog-2.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "keys are private");
        // Every node's certificate verifies as a server certificate for its
        // own address and as a client certificate, against the CA only.
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(certs(&dir.join("ca.pem")).unwrap().remove(0))
            .unwrap();
        let roots = Arc::new(roots);
        let server_verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .unwrap();
        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        for n in &cfg.nodes {
            let chain = certs(&dir.join(format!("{}.pem", n.name))).unwrap();
            let host = n.addr.rsplit_once(':').unwrap().0.to_string();
            for name in [host.as_str(), n.name.as_str(), "localhost"] {
                let server_name =
                    rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
                server_verifier
                    .verify_server_cert(&chain[0], &chain[1..], &server_name, &[], now)
                    .unwrap_or_else(|e| panic!("{} as {name}: {e}", n.name));
            }
            client_verifier
                .verify_client_cert(&chain[0], &chain[1..], now)
                .unwrap();
            assert!(load(&dir, &n.name).is_ok());
        }
        // A certificate of another CA is refused.
        let other = dir.join("other");
        generate(&cfg, &other).unwrap();
        let foreign = certs(&other.join("catalog-1.pem")).unwrap();
        assert!(
            client_verifier
                .verify_client_cert(&foreign[0], &foreign[1..], now)
                .is_err()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
