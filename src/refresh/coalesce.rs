//! Single flight: at most one upstream fetch per image at a time.
//!
//! The fetch runs in its own task, so it completes (and fills the cache) even when every caller
//! waiting for it has gone away, and all concurrent callers await the same shared result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio_util::task::TaskTracker;

use crate::cache::CachedTags;
use crate::upstream::UpstreamError;

pub type FetchResult = Result<Arc<CachedTags>, Arc<UpstreamError>>;
pub type FetchFuture = Shared<BoxFuture<'static, FetchResult>>;

/// The fetches in flight, by cache key.
#[derive(Clone, Default)]
pub struct Coalescer {
    /// A std mutex: only held to look up or insert, never across an await.
    flights: Arc<Mutex<HashMap<String, FetchFuture>>>,
    tracker: TaskTracker,
}

impl Coalescer {
    pub fn new(tracker: TaskTracker) -> Coalescer {
        Coalescer {
            flights: Arc::default(),
            tracker,
        }
    }

    /// Joins the fetch in flight for `key`, or starts `work` as the one fetch. The returned
    /// future may be dropped: the fetch goes on.
    pub fn join<F>(&self, key: &str, work: F) -> FetchFuture
    where
        F: Future<Output = FetchResult> + Send + 'static,
    {
        let mut flights = self.flights.lock().expect("flights lock");
        if let Some(flight) = flights.get(key) {
            return flight.clone();
        }
        let registry = self.flights.clone();
        let owned_key = key.to_owned();
        let handle = self.tracker.spawn(async move {
            let result = work.await;
            registry.lock().expect("flights lock").remove(&owned_key);
            result
        });
        let flight = async move {
            handle.await.unwrap_or_else(|e| {
                Err(Arc::new(UpstreamError::Network {
                    url: String::new(),
                    reason: format!("fetch task failed: {e}"),
                }))
            })
        }
        .boxed()
        .shared();
        flights.insert(key.to_owned(), flight.clone());
        flight
    }

    /// How many fetches are running (for tests and readiness).
    pub fn in_flight(&self) -> usize {
        self.flights.lock().expect("flights lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TagList;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let c = Coalescer::new(TaskTracker::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
        let mut flights = Vec::new();
        for _ in 0..10 {
            let runs = runs.clone();
            let rx = rx.clone();
            flights.push(c.join("k", async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let rx = rx.lock().await.take().unwrap();
                rx.await.unwrap();
                Ok(Arc::new(CachedTags::new(TagList::new(vec![], false, 1))))
            }));
        }
        assert_eq!(c.in_flight(), 1);
        tx.send(()).unwrap();
        for f in flights {
            assert!(f.await.is_ok());
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(c.in_flight(), 0);
    }
}
