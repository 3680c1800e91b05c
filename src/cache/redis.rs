//! The optional shared tier: Redis (or Valkey), shared by every replica.
//!
//! It holds tag lists and digest metadata (the same versioned values as the disk tier), a
//! per-image refresh lock (`SET NX PX`, renewed while the work runs, released only by its
//! owner) so one replica at a time refreshes an image, and a pub/sub channel on which a replica
//! announces a fresh answer so the others drop their in-memory copy.
//!
//! Redis is never required for an answer: every operation has a short time limit, and a failure
//! is a miss (reads), a skipped write, or "lock unavailable" (the replica then works alone). The
//! connection manager reconnects by itself; [`SharedTier::is_up`] reports the state for
//! `/readyz` and metrics.
//!
//! While Redis is down, operations are not attempted at all: each attempt would cost a
//! connection try, and a cold fetch makes one per digest, so a dead Redis would make fetches
//! several times slower and push large ones past their request budget. A watchdog task
//! (`PING` every [`PROBE_DOWN`] while down, every [`PROBE_UP`] while up) finds out when it is
//! back, and the update listener marks it down as soon as its connection drops, so `/readyz`
//! tells the truth without waiting for a request to use Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Key prefix; the version changes when the layout of keys or values does.
const PREFIX: &str = "tag-proxy:v1";
/// Time allowed for one Redis operation before it counts as a failure.
const OP_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the watchdog pings Redis while it answers.
const PROBE_UP: Duration = Duration::from_secs(2);
/// How often the watchdog pings Redis while it is down (operations are skipped meanwhile).
const PROBE_DOWN: Duration = Duration::from_millis(500);
/// Tag lists and digests expire from Redis when nobody refreshed them for this long.
const VALUE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Deletes the lock only if we still own it.
const RELEASE: &str = r"if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";
/// Extends the lock only if we still own it.
const RENEW: &str = r"if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end";

/// What a value in the shared tier is.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Tags,
    Digest,
}

impl Kind {
    fn key(self, key: &str) -> String {
        match self {
            Kind::Tags => format!("{PREFIX}:tags:{key}"),
            Kind::Digest => format!("{PREFIX}:digest:{key}"),
        }
    }
}

/// The outcome of asking for an image's refresh lock.
pub enum Lock {
    /// Ours until the guard is dropped.
    Acquired(LockGuard),
    /// Another replica is refreshing this image.
    Held,
    /// Redis did not answer: work alone.
    Unavailable,
}

/// The shared tier. Cheap to clone.
#[derive(Clone)]
pub struct SharedTier {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    conn: ConnectionManager,
    /// Identifies this replica in lock values and update messages.
    replica: String,
    lock_ttl: Duration,
    up: AtomicBool,
}

impl SharedTier {
    /// Prepares the connection without waiting for Redis: the service starts (and serves from
    /// its other tiers) even when Redis is down.
    pub fn new(url: &str, lock_ttl: Duration) -> Result<SharedTier, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(SharedTier {
            inner: Arc::new(Inner {
                client,
                conn,
                replica: format!("{:016x}", fastrand::u64(..)),
                lock_ttl,
                up: AtomicBool::new(true),
            }),
        })
    }

    /// Whether the last operation reached Redis.
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    /// Runs one operation with the time limit, recording whether Redis answered; skipped (a
    /// `None` at once) while Redis is known to be down.
    async fn run<T>(
        &self,
        what: &str,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        if !self.is_up() {
            return None;
        }
        self.attempt(what, op).await
    }

    /// Marks Redis down (the update listener lost its connection).
    fn mark_down(&self, why: &str) {
        if self.inner.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                reason = why,
                "redis unavailable; serving from the other tiers"
            );
        }
    }

    /// Pings Redis every [`PROBE_UP`] while it answers and every [`PROBE_DOWN`] while it does
    /// not: how a down Redis is found to be back, and an idle one found to be gone.
    pub fn spawn_watchdog(&self, tracker: &TaskTracker, stop: CancellationToken) {
        let tier = self.clone();
        tracker.spawn(async move {
            loop {
                let pause = if tier.is_up() { PROBE_UP } else { PROBE_DOWN };
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
                let mut conn = tier.inner.conn.clone();
                let _ = tier
                    .attempt("ping", async move {
                        redis::cmd("PING").query_async::<String>(&mut conn).await
                    })
                    .await;
            }
        });
    }

    /// Runs one operation with the time limit, recording whether Redis answered.
    async fn attempt<T>(
        &self,
        what: &str,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        let result = tokio::time::timeout(OP_TIMEOUT, op).await;
        let ok = matches!(result, Ok(Ok(_)));
        let was_up = self.inner.up.swap(ok, Ordering::Relaxed);
        match result {
            Ok(Ok(v)) => {
                if !was_up {
                    tracing::info!("redis is reachable again");
                }
                Some(v)
            }
            Ok(Err(e)) => {
                if was_up {
                    tracing::warn!(op = what, error = %e, "redis unavailable; serving from the other tiers");
                }
                None
            }
            Err(_) => {
                if was_up {
                    tracing::warn!(op = what, "redis timed out; serving from the other tiers");
                }
                None
            }
        }
    }

    pub async fn get(&self, kind: Kind, key: &str) -> Option<Vec<u8>> {
        let mut conn = self.inner.conn.clone();
        let k = kind.key(key);
        self.run(
            "get",
            async move { conn.get::<_, Option<Vec<u8>>>(k).await },
        )
        .await
        .flatten()
    }

    /// Stores a value; a fresh tag list is also announced to the other replicas.
    pub async fn put(&self, kind: Kind, key: &str, value: &[u8]) {
        let mut conn = self.inner.conn.clone();
        let k = kind.key(key);
        let value = value.to_vec();
        let announce = matches!(kind, Kind::Tags).then(|| format!("{}\t{key}", self.inner.replica));
        self.run("set", async move {
            let mut pipe = redis::pipe();
            pipe.set_ex(&k, value, VALUE_TTL.as_secs()).ignore();
            if let Some(message) = announce {
                pipe.publish(updates_channel(), message).ignore();
            }
            pipe.query_async::<()>(&mut conn).await
        })
        .await;
    }

    /// Tries to take the refresh lock of an image.
    pub async fn try_lock(&self, key: &str) -> Lock {
        let mut conn = self.inner.conn.clone();
        let lock_key = format!("{PREFIX}:lock:{key}");
        let owner = format!("{}:{:08x}", self.inner.replica, fastrand::u32(..));
        let ttl_ms = self.inner.lock_ttl.as_millis() as u64;
        let (k, o) = (lock_key.clone(), owner.clone());
        let acquired = self
            .run("lock", async move {
                redis::cmd("SET")
                    .arg(&k)
                    .arg(&o)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async::<Option<String>>(&mut conn)
                    .await
            })
            .await;
        match acquired {
            None => Lock::Unavailable,
            Some(None) => Lock::Held,
            Some(Some(_)) => Lock::Acquired(LockGuard::start(self.clone(), lock_key, owner)),
        }
    }

    /// Whether anyone holds the lock of an image (`None`: Redis did not answer).
    pub async fn is_locked(&self, key: &str) -> Option<bool> {
        let mut conn = self.inner.conn.clone();
        let k = format!("{PREFIX}:lock:{key}");
        self.run("exists", async move { conn.exists::<_, bool>(k).await })
            .await
    }

    async fn script(&self, script: &str, key: &str, args: &[String]) {
        let mut conn = self.inner.conn.clone();
        let script = redis::Script::new(script);
        let mut invocation = script.key(key);
        for a in args {
            invocation.arg(a);
        }
        let _ = self
            .run("lock script", async move {
                invocation.invoke_async::<i64>(&mut conn).await
            })
            .await;
    }

    /// Listens for other replicas' announcements and calls `on_update` with each cache key,
    /// reconnecting by itself. After a reconnect `on_resync` is called: announcements may have
    /// been missed.
    pub fn spawn_listener(
        &self,
        tracker: &TaskTracker,
        stop: CancellationToken,
        on_update: impl Fn(&str) + Send + Sync + 'static,
        on_resync: impl Fn() + Send + Sync + 'static,
    ) {
        let tier = self.clone();
        tracker.spawn(async move {
            let mut first = true;
            while !stop.is_cancelled() {
                if let Ok(Ok(mut pubsub)) =
                    tokio::time::timeout(OP_TIMEOUT, tier.inner.client.get_async_pubsub()).await
                    && pubsub.subscribe(updates_channel()).await.is_ok()
                {
                    if !first {
                        on_resync();
                    }
                    first = false;
                    let mut messages = pubsub.on_message();
                    loop {
                        let msg = tokio::select! {
                            () = stop.cancelled() => return,
                            msg = messages.next() => msg,
                        };
                        let Some(msg) = msg else { break };
                        let Ok(text) = msg.get_payload::<String>() else {
                            continue;
                        };
                        if let Some((replica, key)) = text.split_once('\t')
                            && replica != tier.inner.replica
                        {
                            on_update(key);
                        }
                    }
                    tracing::warn!("redis update channel lost; reconnecting");
                }
                tier.mark_down("no connection for updates");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }
}

fn updates_channel() -> String {
    format!("{PREFIX}:updates")
}

/// Holds an image's refresh lock: renews it while alive, releases it (if still ours) on drop.
pub struct LockGuard {
    tier: SharedTier,
    key: String,
    owner: String,
    renewer: tokio::task::JoinHandle<()>,
}

impl LockGuard {
    fn start(tier: SharedTier, key: String, owner: String) -> LockGuard {
        let ttl = tier.inner.lock_ttl;
        let (t, k, o) = (tier.clone(), key.clone(), owner.clone());
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                t.script(RENEW, &k, &[o.clone(), ttl.as_millis().to_string()])
                    .await;
            }
        });
        LockGuard {
            tier,
            key,
            owner,
            renewer,
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.renewer.abort();
        let (tier, key, owner) = (self.tier.clone(), self.key.clone(), self.owner.clone());
        tokio::spawn(async move { tier.script(RELEASE, &key, &[owner]).await });
    }
}
