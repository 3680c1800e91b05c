//! The embedded on-disk tier: a `redb` database in the cache directory.
//!
//! redb commits are durable and atomic (copy-on-write with fsync), so `kill -9` in the middle of
//! a write loses at most that write, never the database. Its calls block, so every one runs on
//! tokio's blocking pool.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

/// Tag lists by image cache key.
const TAGS: TableDefinition<&str, &[u8]> = TableDefinition::new("tags_v1");
/// What each manifest digest describes.
const DIGESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("digests_v1");

/// The file name inside the cache directory.
pub const FILE_NAME: &str = "cache.redb";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cache database: {0}")]
    Db(String),
    #[error("cache database task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn db_err(e: impl std::fmt::Display) -> DiskError {
    DiskError::Db(e.to_string())
}

/// Which table a value lives in.
#[derive(Debug, Clone, Copy)]
pub enum Table {
    Tags,
    Digests,
}

impl Table {
    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Table::Tags => TAGS,
            Table::Digests => DIGESTS,
        }
    }
}

/// A handle to the database; cheap to clone.
#[derive(Clone)]
pub struct DiskStore {
    db: Arc<Database>,
}

impl DiskStore {
    /// Opens (or creates) the database in `dir`, creating the directory and tables.
    ///
    /// The cache is disposable: a file that is not a readable database (damaged, truncated,
    /// not redb at all) is moved aside as `cache.redb.damaged-<unix time>` and a new one is
    /// started, with a warning. A database another process holds open is an error.
    pub fn open(dir: &Path) -> Result<DiskStore, DiskError> {
        std::fs::create_dir_all(dir).map_err(db_err)?;
        let path = dir.join(FILE_NAME);
        let db = match Database::create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(db_err(redb::DatabaseError::DatabaseAlreadyOpen));
            }
            Err(e) if path.exists() => {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let aside = dir.join(format!("{FILE_NAME}.damaged-{secs}"));
                tracing::warn!(error = %e, moved_to = %aside.display(),
                    "the cache database is unreadable; moving it aside and starting empty");
                std::fs::rename(&path, &aside).map_err(db_err)?;
                Database::create(&path).map_err(db_err)?
            }
            Err(e) => return Err(db_err(e)),
        };
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(TAGS).map_err(db_err)?;
        txn.open_table(DIGESTS).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(DiskStore { db: Arc::new(db) })
    }

    pub async fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, DiskError> {
        let db = self.db.clone();
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(db_err)?;
            let t = txn.open_table(table.def()).map_err(db_err)?;
            Ok(t.get(key.as_str())
                .map_err(db_err)?
                .map(|v| v.value().to_vec()))
        })
        .await?
    }

    pub async fn put(&self, table: Table, key: &str, value: Vec<u8>) -> Result<(), DiskError> {
        let db = self.db.clone();
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut t = txn.open_table(table.def()).map_err(db_err)?;
                t.insert(key.as_str(), value.as_slice()).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)
        })
        .await?
    }

    /// How many entries a table holds (for `/metrics` and `/readyz`).
    pub async fn len(&self, table: Table) -> Result<u64, DiskError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(db_err)?;
            let t = txn.open_table(table.def()).map_err(db_err)?;
            t.len().map_err(db_err)
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), vec![0x5a; 70_000]).unwrap();
        let store = DiskStore::open(dir.path()).expect("starts with an empty cache");
        drop(store);
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("cache.redb.damaged-")
            });
        assert!(aside, "the damaged file is kept for inspection");
    }

    #[tokio::test]
    async fn round_trip_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = DiskStore::open(dir.path()).unwrap();
            store.put(Table::Tags, "k", b"v".to_vec()).await.unwrap();
            assert_eq!(
                store.get(Table::Tags, "k").await.unwrap(),
                Some(b"v".to_vec())
            );
            assert_eq!(store.get(Table::Digests, "k").await.unwrap(), None);
        }
        let store = DiskStore::open(dir.path()).unwrap();
        assert_eq!(
            store.get(Table::Tags, "k").await.unwrap(),
            Some(b"v".to_vec())
        );
        assert_eq!(store.len(Table::Tags).await.unwrap(), 1);
    }
}
