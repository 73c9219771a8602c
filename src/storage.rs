//! What the catalog and order stores share: opening SQLite crash-safe (WAL,
//! fsync on commit), the identity a data directory carries, and a writer
//! thread that commits concurrent writes in batches (group commit: one fsync
//! for many writes, none acknowledged before it).

use std::path::{Path, PathBuf};

use rusqlite::Connection;
use tokio::sync::mpsc;

/// Most writes committed by one transaction.
pub const MAX_BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {path} is corrupt or unreadable: {source}")]
    Corrupt {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "data directory {path} belongs to cluster {found_cluster} node {found_node}, not to cluster {cluster} node {node}; refusing to serve its data"
    )]
    WrongOwner {
        path: PathBuf,
        found_cluster: String,
        found_node: String,
        cluster: String,
        node: String,
    },
    #[error("storage error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Who a data directory belongs to. `incarnation` is new whenever the
/// directory is created afresh, so a replica whose disk was replaced or
/// restored can be told from the one that was there before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub cluster_id: String,
    pub node: String,
    pub incarnation: u64,
    /// The directory was created by this start.
    pub fresh: bool,
}

/// Opens (creating if needed) `dir/file` with the settings every store uses.
pub fn open(dir: &Path, file: &str) -> Result<Connection, StorageError> {
    std::fs::create_dir_all(dir).map_err(|source| StorageError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(file);
    let corrupt = |source| StorageError::Corrupt {
        path: path.clone(),
        source,
    };
    let conn = Connection::open(&path).map_err(corrupt)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(corrupt)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(corrupt)?;
    // FULL: the WAL is fsync'd at every commit, so a commit is durable when it returns.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(corrupt)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(corrupt)?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(corrupt)?;
    if check != "ok" {
        return Err(StorageError::Corrupt {
            path,
            source: rusqlite::Error::InvalidQuery,
        });
    }
    Ok(conn)
}

/// The file in every data directory that names its owner.
pub const IDENTITY_FILE: &str = "identity.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct IdentityFile {
    cluster_id: String,
    node: String,
    incarnation: u64,
}

/// Checks (or, for a new directory, records) who owns `dir`. A directory
/// with data but no identity, or an identity of another cluster or node,
/// is refused: serving it would serve wrong data.
pub fn claim(
    dir: &Path,
    data_file: &str,
    cluster_id: &str,
    node: &str,
) -> Result<Identity, StorageError> {
    let path = dir.join(IDENTITY_FILE);
    let corrupt = |why: String| {
        StorageError::Invalid(format!(
            "data directory {} is corrupt: {why}",
            dir.display()
        ))
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let id: IdentityFile = serde_json::from_slice(&bytes)
                .map_err(|e| corrupt(format!("{IDENTITY_FILE}: {e}")))?;
            if id.cluster_id != cluster_id || id.node != node {
                return Err(StorageError::WrongOwner {
                    path: dir.to_path_buf(),
                    found_cluster: id.cluster_id,
                    found_node: id.node,
                    cluster: cluster_id.to_string(),
                    node: node.to_string(),
                });
            }
            Ok(Identity {
                cluster_id: id.cluster_id,
                node: id.node,
                incarnation: id.incarnation,
                fresh: false,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.join(data_file).exists() {
                return Err(corrupt(format!(
                    "it holds {data_file} but no {IDENTITY_FILE}"
                )));
            }
            std::fs::create_dir_all(dir).map_err(|source| StorageError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
            // Grows with every directory created (wall-clock microseconds), as
            // the replication core requires of incarnations.
            let incarnation = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(1)
                .max(1);
            let id = IdentityFile {
                cluster_id: cluster_id.to_string(),
                node: node.to_string(),
                incarnation,
            };
            write_durably(
                &path,
                &serde_json::to_vec_pretty(&id).expect("identity serialises"),
            )
            .map_err(|source| StorageError::CreateDir {
                path: path.clone(),
                source,
            })?;
            Ok(Identity {
                cluster_id: id.cluster_id,
                node: id.node,
                incarnation,
                fresh: true,
            })
        }
        Err(e) => Err(corrupt(format!("cannot read {IDENTITY_FILE}: {e}"))),
    }
}

/// Writes a file via a temporary and a rename, fsyncing both and the folder.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Starts the thread that owns `conn` for writing: it takes every job
/// waiting (up to [`MAX_BATCH`]) and hands them to `commit` together, which
/// writes them in one transaction and answers each job after the commit.
pub fn spawn_writer<J: Send + 'static>(
    name: &str,
    mut conn: Connection,
    mut commit: impl FnMut(&mut Connection, Vec<J>) + Send + 'static,
) -> mpsc::Sender<J> {
    let (tx, mut rx) = mpsc::channel::<J>(4 * MAX_BATCH);
    std::thread::Builder::new()
        .name(format!("{name}-writer"))
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut batch = Vec::with_capacity(16);
                batch.push(first);
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(j) => batch.push(j),
                        Err(_) => break,
                    }
                }
                commit(&mut conn, batch);
            }
        })
        .expect("spawning a thread succeeds");
    tx
}

/// Seconds since the Unix epoch as RFC 3339 UTC (`2026-11-24T11:12:51Z`).
pub fn rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    // Civil-from-days (proleptic Gregorian), after H. Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn a_data_dir_refuses_another_cluster_or_node() {
        let dir =
            std::env::temp_dir().join(format!("pygmy-claim-{}", uuid::Uuid::new_v4().simple()));
        let first = claim(&dir, "t.sqlite", "c1", "catalog-1").unwrap();
        assert!(first.fresh);
        let again = claim(&dir, "t.sqlite", "c1", "catalog-1").unwrap();
        assert_eq!(again.incarnation, first.incarnation);
        assert!(!again.fresh);
        assert!(matches!(
            claim(&dir, "t.sqlite", "c2", "catalog-1"),
            Err(StorageError::WrongOwner { .. })
        ));
        assert!(matches!(
            claim(&dir, "t.sqlite", "c1", "catalog-2"),
            Err(StorageError::WrongOwner { .. })
        ));
        std::fs::remove_file(dir.join(IDENTITY_FILE)).unwrap();
        std::fs::write(dir.join("t.sqlite"), b"data").unwrap();
        assert!(
            matches!(
                claim(&dir, "t.sqlite", "c1", "catalog-1"),
                Err(StorageError::Invalid(_))
            ),
            "data without identity"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
