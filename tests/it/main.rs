//! The one integration-test binary. Each module drives one surface of the service.

mod support;

// Filtering, sorting, /tags/latest, ETag/304, compression, OpenAPI.
mod answers;

// The HTTP contract: 400s, routes, health, /metrics through promtool.
mod api;

// Single flight, stale-while-revalidate, stale-if-error, persistence across restarts.
mod cache;

// The image's static binary in an empty root (chroot): /tags via /etc/hosts, DNS and TLS.
mod container;

// The service against the Docker Hub fake: shape, order, paging, caps, failures.
mod dockerhub;

// The service against the real distribution registry on loopback.
mod oci_registry;

// Back-off, retries, breaker, rate cap, credentials, incremental refresh.
mod politeness;

// Several replicas sharing a real redis-server.
mod replicas;

// Self-tests of the test harness: the fakes and the real registry behave as the reference says.
mod selftest_hub;
mod selftest_registry;
