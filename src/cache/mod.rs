//! The cache tiers: a `moka` memory tier in front of the optional shared Redis tier and the
//! embedded `redb` disk tier.
//!
//! Reads look in memory, then in Redis and on disk (promoting what they find); writes go to
//! every tier. Values on disk carry a format version: an entry of another version is a miss, never
//! a crash. The memory tier keeps each tag list together with its serialized JSON body, so a hit
//! is sent without re-serializing anything.

pub mod disk;
pub mod redis;

use std::future::Future;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::api::encoding::Encoding;
use crate::model::TagList;
use crate::selection::VersionIndex;
use crate::upstream::UpstreamError;
use crate::upstream::manifest::DigestInfo;
use disk::{DiskStore, Table};
use redis::{Kind, SharedTier};

/// The on-disk format version of every value. Bump it when a stored type changes shape.
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Stored<T> {
    v: u32,
    value: T,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(&Stored {
        v: FORMAT_VERSION,
        value,
    })
    .expect("cache values serialize")
}

/// Decodes a stored value; another version or a damaged value is treated as absent.
fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Option<T> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    match serde_json::from_slice::<Version>(bytes) {
        Ok(Version { v: FORMAT_VERSION }) => {}
        Ok(Version { v }) => {
            tracing::info!(
                key,
                version = v,
                "ignoring a cache entry of another format version"
            );
            return None;
        }
        Err(e) => {
            tracing::warn!(key, error = %e, "ignoring an unreadable cache entry");
            return None;
        }
    }
    match serde_json::from_slice::<Stored<T>>(bytes) {
        Ok(s) => Some(s.value),
        Err(e) => {
            tracing::warn!(key, error = %e, "ignoring an unreadable cache entry");
            None
        }
    }
}

/// A cached answer: the tag list, its JSON body and that body's ETag, ready to send; and the
/// body's compressed forms, made on first use and kept with the entry.
#[derive(Debug)]
pub struct CachedTags {
    pub list: TagList,
    pub body: Bytes,
    pub etag: String,
    encoded: [OnceLock<Bytes>; 2],
    /// The tags' versions, parsed on the first request that selects or sorts.
    versions: OnceLock<VersionIndex>,
}

impl CachedTags {
    pub fn new(list: TagList) -> CachedTags {
        let body = crate::sendfile::freeze(serde_json::to_vec(&list.tags).expect("tags serialize"));
        CachedTags {
            etag: crate::api::encoding::etag_of(&body),
            list,
            body,
            encoded: Default::default(),
            versions: OnceLock::new(),
        }
    }

    /// The tags' versions, parsed once per entry.
    pub fn versions(&self) -> &VersionIndex {
        self.versions
            .get_or_init(|| VersionIndex::new(&self.list.tags))
    }

    /// The body in `encoding`, compressed once per entry.
    pub fn encoded(&self, encoding: Encoding) -> Bytes {
        let slot = match encoding {
            Encoding::Identity => return self.body.clone(),
            Encoding::Gzip => &self.encoded[0],
            Encoding::Brotli => &self.encoded[1],
        };
        // Frozen (memory-mapped, sent with `sendfile`) like the body: made once, sent many times.
        slot.get_or_init(|| crate::sendfile::freeze(encoding.compress(&self.body).into()))
            .clone()
    }
}

/// Tag lists by image: memory, then the shared tier (Redis) when configured, then disk.
#[derive(Clone)]
pub struct TagCache {
    memory: moka::future::Cache<String, Arc<CachedTags>>,
    shared: Option<SharedTier>,
    disk: DiskStore,
}

impl TagCache {
    pub fn new(disk: DiskStore, shared: Option<SharedTier>, memory_entries: u64) -> TagCache {
        TagCache {
            memory: moka::future::Cache::new(memory_entries),
            shared,
            disk,
        }
    }

    /// The cached answer for `key`, from memory, Redis or disk (the newer of the two when both
    /// have it). A failing tier is a miss (logged).
    pub async fn get(&self, key: &str) -> Option<Arc<CachedTags>> {
        if let Some(hit) = self.memory.get(key).await {
            return Some(hit);
        }
        // Both at once: a Redis round trip and a disk read, neither waiting for the other.
        let (shared, local) = tokio::join!(self.get_shared(key), self.get_disk(key));
        let entry = match (shared, local) {
            (Some(s), Some(d)) if d.list.fetched_at > s.list.fetched_at => d,
            (Some(s), _) => s,
            (None, d) => d?,
        };
        self.memory.insert(key.to_owned(), entry.clone()).await;
        Some(entry)
    }

    /// The shared tier's answer for `key`, bypassing memory (for replicas waiting on another
    /// replica's fetch). Promoted to memory when found.
    pub async fn get_shared(&self, key: &str) -> Option<Arc<CachedTags>> {
        let bytes = self.shared.as_ref()?.get(Kind::Tags, key).await?;
        Some(Arc::new(CachedTags::new(decode::<TagList>(key, &bytes)?)))
    }

    /// Puts an entry found elsewhere (the shared tier) into memory.
    pub async fn promote(&self, key: &str, entry: Arc<CachedTags>) {
        self.memory.insert(key.to_owned(), entry).await;
    }

    /// Drops the in-memory copy (another replica announced a fresher one).
    pub async fn forget(&self, key: &str) {
        self.memory.invalidate(key).await;
    }

    /// Drops every in-memory copy (announcements may have been missed).
    pub fn forget_all(&self) {
        self.memory.invalidate_all();
    }

    pub fn shared(&self) -> Option<&SharedTier> {
        self.shared.as_ref()
    }

    async fn get_disk(&self, key: &str) -> Option<Arc<CachedTags>> {
        let bytes = match self.disk.get(Table::Tags, key).await {
            Ok(b) => b?,
            Err(e) => {
                tracing::warn!(key, error = %e, "disk cache read failed");
                return None;
            }
        };
        Some(Arc::new(CachedTags::new(decode::<TagList>(key, &bytes)?)))
    }

    /// Stores a fresh answer in every tier (and announces it to other replicas). A failing
    /// tier is logged; the others still serve it.
    pub async fn put(&self, key: &str, list: TagList) -> Arc<CachedTags> {
        let bytes = encode(&list);
        if let Some(shared) = &self.shared {
            shared.put(Kind::Tags, key, &bytes).await;
        }
        if let Err(e) = self.disk.put(Table::Tags, key, bytes).await {
            tracing::error!(key, error = %e, "disk cache write failed");
        }
        let entry = Arc::new(CachedTags::new(list));
        self.memory.insert(key.to_owned(), entry.clone()).await;
        entry
    }

    pub fn memory_entries(&self) -> u64 {
        self.memory.entry_count()
    }

    pub fn disk(&self) -> &DiskStore {
        &self.disk
    }
}

/// What digests describe; kept forever, since a digest's content never changes.
#[derive(Clone)]
pub struct DigestCache {
    memory: moka::future::Cache<String, Arc<DigestInfo>>,
    shared: Option<SharedTier>,
    disk: DiskStore,
}

impl DigestCache {
    pub fn new(disk: DiskStore, shared: Option<SharedTier>, memory_entries: u64) -> DigestCache {
        DigestCache {
            memory: moka::future::Cache::new(memory_entries),
            shared,
            disk,
        }
    }

    /// The info for `digest` from memory, disk, or — once, however many ask at the same time
    /// (moka coalesces concurrent initialisations of a key) — from `fetch`.
    pub async fn get_or_fetch(
        &self,
        digest: &str,
        fetch: impl Future<Output = Result<DigestInfo, UpstreamError>>,
    ) -> Result<Arc<DigestInfo>, UpstreamError> {
        let init = async {
            if let Ok(Some(bytes)) = self.disk.get(Table::Digests, digest).await
                && let Some(info) = decode::<DigestInfo>(digest, &bytes)
            {
                return Ok(Arc::new(info));
            }
            if let Some(shared) = &self.shared
                && let Some(bytes) = shared.get(Kind::Digest, digest).await
                && let Some(info) = decode::<DigestInfo>(digest, &bytes)
            {
                let _ = self.disk.put(Table::Digests, digest, bytes).await;
                return Ok(Arc::new(info));
            }
            let info = fetch.await?;
            let bytes = encode(&info);
            if let Some(shared) = &self.shared {
                shared.put(Kind::Digest, digest, &bytes).await;
            }
            if let Err(e) = self.disk.put(Table::Digests, digest, bytes).await {
                tracing::error!(digest, error = %e, "disk cache write failed");
            }
            Ok(Arc::new(info))
        };
        self.memory
            .try_get_with(digest.to_owned(), init)
            .await
            .map_err(|e: Arc<UpstreamError>| (*e).clone())
    }

    pub fn memory_entries(&self) -> u64 {
        self.memory.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_versions_and_damage_are_misses() {
        let list = TagList::new(vec![], false, 10);
        let good = encode(&list);
        assert_eq!(decode::<TagList>("k", &good), Some(list));
        assert_eq!(decode::<TagList>("k", br#"{"v":2,"value":{"x":1}}"#), None);
        assert_eq!(decode::<TagList>("k", br#"{"v":1,"value":{"x":1}}"#), None);
        assert_eq!(decode::<TagList>("k", b"\x00garbage"), None);
    }

    #[tokio::test]
    async fn digest_fetch_runs_once_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskStore::open(dir.path()).unwrap();
        let cache = DigestCache::new(disk.clone(), None, 100);
        let info = DigestInfo {
            platforms: vec![],
            created: None,
        };
        let got = cache
            .get_or_fetch("sha256:aa", async { Ok(info.clone()) })
            .await
            .unwrap();
        assert_eq!(*got, info);
        let again = DigestCache::new(disk, None, 100)
            .get_or_fetch("sha256:aa", async { panic!("must come from disk") })
            .await
            .unwrap();
        assert_eq!(*again, info);
    }
}
