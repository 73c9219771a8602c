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
    /// The data file is not the one this identity last sealed: the
    /// directory was restored from a copy (or copied), so it may be older
    /// than what this replica promised its peers. `incarnation` is then
    /// new, so the replica rejoins as a learner.
    pub copied: bool,
    /// The data file this identity last sealed is not there: deleted (or
    /// moved away) while the node was down. `incarnation` is then new.
    pub missing: bool,
}

/// Which file a data directory's data lives in, as the file system names
/// it: inode number and creation time (where the file system keeps one;
/// an inode number alone can be reused by a file created after a delete).
/// A file copied or restored from a backup is a new file; the same file,
/// restarted, keeps both. The device number is left out: it can change
/// between mounts.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    born_ns: Option<u64>,
}

fn stamp_of(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    let born_ns = m
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64);
    Some(FileStamp {
        ino: m.ino(),
        born_ns,
    })
}

/// A new incarnation: wall-clock microseconds, and above `after`, so
/// incarnations grow as the replication core requires.
fn new_incarnation(after: u64) -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
        .max(after + 1)
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
    /// The data file this identity belongs to (see [`seal`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data_file: Option<FileStamp>,
    /// A process runs on this directory, or the last one did not stop
    /// cleanly (see [`mark_running`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    running: bool,
}

fn write_identity(path: &Path, id: &IdentityFile) -> Result<(), StorageError> {
    write_durably(
        path,
        &serde_json::to_vec_pretty(id).expect("identity serialises"),
    )
    .map_err(|source| StorageError::CreateDir {
        path: path.to_path_buf(),
        source,
    })
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
            let now = stamp_of(&dir.join(data_file));
            let copied = now.is_some() && id.data_file.is_some() && now != id.data_file;
            let missing = now.is_none() && id.data_file.is_some();
            let mut id = id;
            if copied || missing {
                id.incarnation = new_incarnation(id.incarnation);
                id.data_file = now;
                write_identity(&path, &id)?;
            }
            Ok(Identity {
                cluster_id: id.cluster_id,
                node: id.node,
                incarnation: id.incarnation,
                fresh: false,
                copied,
                missing,
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
            let incarnation = new_incarnation(0);
            let id = IdentityFile {
                cluster_id: cluster_id.to_string(),
                node: node.to_string(),
                incarnation,
                data_file: None,
                running: false,
            };
            write_identity(&path, &id)?;
            Ok(Identity {
                cluster_id: id.cluster_id,
                node: id.node,
                incarnation,
                fresh: true,
                copied: false,
                missing: false,
            })
        }
        Err(e) => Err(corrupt(format!("cannot read {IDENTITY_FILE}: {e}"))),
    }
}

/// Records which file holds `dir`'s data (once it exists), so a later
/// `claim` can tell the same file from a copy of it. With `force`, it
/// records the file there now: an operator who moved a stopped replica's
/// directory by copying it (and knows it is its latest state) says so.
pub fn seal(dir: &Path, data_file: &str, force: bool) -> Result<(), StorageError> {
    let path = dir.join(IDENTITY_FILE);
    let bytes = std::fs::read(&path).map_err(|source| StorageError::CreateDir {
        path: path.clone(),
        source,
    })?;
    let mut id: IdentityFile = serde_json::from_slice(&bytes).map_err(|e| {
        StorageError::Invalid(format!(
            "data directory {} is corrupt: {IDENTITY_FILE}: {e}",
            dir.display()
        ))
    })?;
    let now = stamp_of(&dir.join(data_file));
    if now.is_some() && (id.data_file.is_none() || force) && id.data_file != now {
        id.data_file = now;
        write_identity(&path, &id)?;
    }
    Ok(())
}

/// Gives `dir` a new incarnation: its data is gone (an emptied or deleted
/// database next to its identity), so what it promised its peers is too.
pub fn renew(dir: &Path, identity: &Identity) -> Result<Identity, StorageError> {
    let path = dir.join(IDENTITY_FILE);
    let incarnation = new_incarnation(identity.incarnation);
    write_identity(
        &path,
        &IdentityFile {
            cluster_id: identity.cluster_id.clone(),
            node: identity.node.clone(),
            incarnation,
            data_file: None,
            running: true,
        },
    )?;
    Ok(Identity {
        incarnation,
        ..identity.clone()
    })
}

fn read_identity(dir: &Path) -> Result<(std::path::PathBuf, IdentityFile), StorageError> {
    let path = dir.join(IDENTITY_FILE);
    let bytes = std::fs::read(&path).map_err(|source| StorageError::CreateDir {
        path: path.clone(),
        source,
    })?;
    let id = serde_json::from_slice(&bytes).map_err(|e| {
        StorageError::Invalid(format!(
            "data directory {} is corrupt: {IDENTITY_FILE}: {e}",
            dir.display()
        ))
    })?;
    Ok((path, id))
}

/// Records, durably, that a process now runs on `dir`; answers whether the
/// last one stopped without [`mark_stopped`] (it crashed, or was killed).
/// SQLite removes a database's write-ahead log when its last connection
/// closes cleanly, and only then: a log that is missing after a stop that
/// was not clean was deleted, and took committed transactions with it.
pub fn mark_running(dir: &Path) -> Result<bool, StorageError> {
    let (path, mut id) = read_identity(dir)?;
    let unclean = id.running;
    if !id.running {
        id.running = true;
        write_identity(&path, &id)?;
    }
    Ok(unclean)
}

/// Records that the process running on `dir` closed its database cleanly.
pub fn mark_stopped(dir: &Path) -> Result<(), StorageError> {
    let (path, mut id) = read_identity(dir)?;
    if id.running {
        id.running = false;
        write_identity(&path, &id)?;
    }
    Ok(())
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

/// Starts the thread that owns `conn` for writing: jobs arrive in groups
/// (those handed over together); it takes every group waiting (until it
/// holds [`MAX_BATCH`] jobs or more) and hands their jobs to `commit`
/// together, which writes them in one transaction and answers each job
/// after the commit.
pub fn spawn_writer<J: Send + 'static>(
    name: &str,
    mut conn: Connection,
    mut commit: impl FnMut(&mut Connection, Vec<J>) + Send + 'static,
) -> (mpsc::Sender<Vec<J>>, std::thread::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Vec<J>>(4 * MAX_BATCH);
    let thread = std::thread::Builder::new()
        .name(format!("{name}-writer"))
        .spawn(move || {
            while let Some(mut batch) = rx.blocking_recv() {
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(jobs) => batch.extend(jobs),
                        Err(_) => break,
                    }
                }
                if !batch.is_empty() {
                    commit(&mut conn, batch);
                }
            }
        })
        .expect("spawning a thread succeeds");
    (tx, thread)
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
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_copied_data_file_gets_a_new_incarnation_and_the_same_file_keeps_its_own() {
        let dir =
            std::env::temp_dir().join(format!("pygmy-copy-{}", uuid::Uuid::new_v4().simple()));
        let first = claim(&dir, "t.sqlite", "c1", "catalog-1").unwrap();
        std::fs::write(dir.join("t.sqlite"), b"state at 1").unwrap();
        seal(&dir, "t.sqlite", false).unwrap();
        // Restarted on the same file: the same replica.
        let again = claim(&dir, "t.sqlite", "c1", "catalog-1").unwrap();
        assert_eq!(
            (again.incarnation, again.copied),
            (first.incarnation, false)
        );
        // An old copy put back in its place (the way backups are restored).
        let copy = dir.with_extension("bak");
        std::fs::copy(dir.join("t.sqlite"), &copy).unwrap();
        std::fs::remove_file(dir.join("t.sqlite")).unwrap();
        std::fs::copy(&copy, dir.join("t.sqlite")).unwrap();
        let restored = claim(&dir, "t.sqlite", "c1", "catalog-1").unwrap();
        assert!(restored.copied, "a restored copy must be told apart");
        assert!(restored.incarnation > first.incarnation);
        // It keeps that incarnation from now on, on its own file.
        let later = claim(&dir, "t.sqlite", "c1", "catalog-1").unwrap();
        assert_eq!(
            (later.incarnation, later.copied),
            (restored.incarnation, false)
        );
        // An operator who moved the directory vouches for it with `seal --force`.
        std::fs::remove_file(dir.join("t.sqlite")).unwrap();
        std::fs::copy(&copy, dir.join("t.sqlite")).unwrap();
        seal(&dir, "t.sqlite", true).unwrap();
        let moved = claim(&dir, "t.sqlite", "c1", "catalog-1").unwrap();
        assert_eq!(
            (moved.incarnation, moved.copied),
            (restored.incarnation, false)
        );
        // Data gone next to its identity: a new incarnation.
        let renewed = renew(&dir, &moved).unwrap();
        assert!(renewed.incarnation > moved.incarnation);
        assert_eq!(
            claim(&dir, "t.sqlite", "c1", "catalog-1")
                .unwrap()
                .incarnation,
            renewed.incarnation
        );
        // The data file deleted while the node was down: told apart too.
        seal(&dir, "t.sqlite", true).unwrap();
        let sealed = claim(&dir, "t.sqlite", "c1", "catalog-1").unwrap();
        assert!(!sealed.missing);
        std::fs::remove_file(dir.join("t.sqlite")).unwrap();
        let gone = claim(&dir, "t.sqlite", "c1", "catalog-1").unwrap();
        assert!(
            gone.missing && !gone.copied,
            "a deleted data file must be told apart"
        );
        assert!(gone.incarnation > sealed.incarnation);
        // Until a new file is sealed, a restart does not report it again.
        let next = claim(&dir, "t.sqlite", "c1", "catalog-1").unwrap();
        assert_eq!((next.incarnation, next.missing), (gone.incarnation, false));
        std::fs::remove_file(&copy).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn data_without_identity_is_refused() {
        let dir =
            std::env::temp_dir().join(format!("pygmy-noid-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
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

/// One field of a stored row, as its checksum reads it.
pub enum Field<'a> {
    Int(i64),
    Text(&'a str),
    Bytes(&'a [u8]),
    Null,
}

/// A stored row's checksum: the first 8 bytes of SHA-256 over the table's
/// name and the row's fields (each tagged and length-prefixed, so no two
/// rows of different content share an input). Stored beside the row and
/// verified whenever the row is read, so a damaged row is refused, never
/// served.
pub fn row_sum(table: &str, fields: &[Field<'_>]) -> i64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut put = |tag: u8, bytes: &[u8]| {
        h.update([tag]);
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    put(0, table.as_bytes());
    for f in fields {
        match f {
            Field::Int(v) => put(1, &v.to_le_bytes()),
            Field::Text(s) => put(2, s.as_bytes()),
            Field::Bytes(b) => put(3, b),
            Field::Null => put(4, &[]),
        }
    }
    let d = h.finalize();
    i64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Damage found in a store's data: a row whose checksum does not match, or
/// content that cannot be what this program wrote.
#[derive(Debug, thiserror::Error)]
#[error("damaged data: {0}")]
pub struct Damaged(pub String);

impl Damaged {
    /// As a SQLite error, so it travels through the stores' results.
    pub fn into_sqlite(self) -> rusqlite::Error {
        rusqlite::Error::ToSqlConversionFailure(Box::new(self))
    }

    /// The damage an error reports, if it is one (also SQLite's own
    /// "malformed" and "not a database").
    pub fn find(e: &rusqlite::Error) -> Option<String> {
        match e {
            rusqlite::Error::ToSqlConversionFailure(b) => {
                b.downcast_ref::<Damaged>().map(|d| d.0.clone())
            }
            rusqlite::Error::SqliteFailure(f, msg)
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase
                ) =>
            {
                Some(msg.clone().unwrap_or_else(|| f.to_string()))
            }
            _ => None,
        }
    }
}

/// Checks a row read back against its stored checksum.
pub fn verify_row(table: &str, fields: &[Field<'_>], stored: i64) -> rusqlite::Result<()> {
    if row_sum(table, fields) == stored {
        Ok(())
    } else {
        Err(Damaged(format!("a row of {table} does not match its checksum")).into_sqlite())
    }
}

/// The marker a replica leaves in its data directory when it found its data
/// damaged while running: the next start sets the database aside.
const DAMAGED_FILE: &str = "DAMAGED";

/// Records that `dir`'s data is damaged (durably), with the reason.
pub fn mark_damaged(dir: &Path, reason: &str) -> std::io::Result<()> {
    let path = dir.join(DAMAGED_FILE);
    let mut f = std::fs::File::create(&path)?;
    std::io::Write::write_all(&mut f, reason.as_bytes())?;
    f.sync_all()?;
    std::fs::File::open(dir)?.sync_all()
}

/// The reason recorded by [`mark_damaged`], if any.
pub fn damaged_mark(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join(DAMAGED_FILE)).ok()
}

/// Moves a damaged database (and its write-ahead log) aside, keeping it
/// for the operator, and clears the damage marker: the next open starts
/// from an empty database. Returns the name it was moved to.
pub fn set_aside(dir: &Path, data_file: &str) -> std::io::Result<String> {
    let aside = format!("{data_file}.damaged-{}", crate::api::unix_ms());
    for (from, to) in [
        (data_file.to_string(), aside.clone()),
        (format!("{data_file}-wal"), format!("{aside}-wal")),
    ] {
        match std::fs::rename(dir.join(&from), dir.join(&to)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    let _ = std::fs::remove_file(dir.join(format!("{data_file}-shm")));
    match std::fs::remove_file(dir.join(DAMAGED_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(aside)
}

/// Replaces this process with a fresh start of the same command (same
/// process id, so whatever supervises it sees nothing): how a replica
/// whose data was found damaged rebuilds itself. Returns only if that
/// fails.
pub fn restart_process() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return e,
    };
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    std::process::Command::new(exe).args(args).exec()
}
