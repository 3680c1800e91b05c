//! Sending large cached answers without copying them.
//!
//! A cached answer is written to thousands of clients, unchanged. Written from heap memory,
//! every response costs the kernel a copy of the whole body into socket buffers; for a
//! 1,000-tag image (225 KB) that copy is most of the CPU a request costs (see BENCHMARKS.md,
//! item 1). nginx avoids it with `sendfile(2)` from the page cache, and so does this module:
//!
//! - [`freeze`] puts a large body into a sealed `memfd` (an anonymous in-memory file that can
//!   never change again) and maps it read-only. The [`Bytes`] it returns point into that
//!   mapping, so the rest of the service uses them like any other bytes (ETags, compression,
//!   selection) at no extra memory cost.
//! - [`Listener`] wraps the server's `TcpListener`. Its connections look at every buffer hyper
//!   writes: a buffer that lies inside a registered mapping is sent with `sendfile` from the
//!   `memfd` at the matching offset (the kernel passes page references, no copy), everything
//!   else (headers, small bodies) with an ordinary `writev`. The headers go out with
//!   `MSG_MORE` when a body follows, so they share the body's first segment.
//!
//! Why this is sound: a mapping stays registered for exactly as long as some [`Bytes`] points
//! into it, and hyper holds the [`Bytes`] of a response until it is written, so a pointer that
//! hyper hands to `write` and that falls inside a registered mapping is one of ours, alive, and
//! the `memfd` behind it is sealed against every write, so the pages the kernel references
//! cannot change under a response in flight.
//!
//! Mapped bodies cost one file descriptor and one mapping each, so only bodies of at least
//! [`MIN_MAPPED_LEN`] bytes get one, and at most [`MAX_MAPPED`] of them, and never more than a
//! quarter of the process's open-file limit, exist at a time: the descriptors a busy server
//! needs for its connections always come first. [`raise_open_file_limit`] (called once at
//! start) lifts the soft limit to the hard one, as nginx's `worker_rlimit_nofile` and Go's
//! runtime do, because service managers and container runtimes often start processes with a
//! soft limit of 1,024. Past the cap, or if the kernel refuses (`EMFILE`, no `memfd`), a body
//! simply stays on the heap and is written the ordinary way. Linux only; elsewhere [`freeze`]
//! keeps the heap.

use bytes::Bytes;

pub use imp::{Listener, listen, raise_open_file_limit};

/// Bodies smaller than this are copied: below it the copy costs less than the `sendfile`
/// bookkeeping, and small bodies are most of the cache (a 100-tag answer is about 22 KB).
pub const MIN_MAPPED_LEN: usize = 32 * 1024;

/// At most this many mapped bodies at once (one file descriptor and one mapping each), and at
/// most a quarter of the open-file limit. The memory tier keeps up to `--memory-entries`
/// answers with up to three forms each; only the large ones count here, and past the limit the
/// rest stay on the heap.
pub const MAX_MAPPED: usize = 4096;

/// How many mapped bodies may exist at once, given an open-file soft limit.
pub fn mapped_cap(open_file_limit: Option<u64>) -> usize {
    match open_file_limit {
        None => MAX_MAPPED,
        Some(limit) => MAX_MAPPED.min(usize::try_from(limit / 4).unwrap_or(usize::MAX)),
    }
}

/// `data` as [`Bytes`]: mapped from a sealed `memfd` when it is large enough and a slot is free
/// (so that [`Listener`]'s connections send it with `sendfile`), else on the heap.
pub fn freeze(data: Vec<u8>) -> Bytes {
    if data.len() < MIN_MAPPED_LEN {
        return Bytes::from(data);
    }
    imp::map(data)
}

/// Whether `bytes` point into a mapped body (for tests and the benchmark's sanity checks).
pub fn is_mapped(bytes: &[u8]) -> bool {
    imp::is_mapped(bytes)
}

#[cfg(target_os = "linux")]
mod imp {
    use std::collections::BTreeMap;
    use std::io::{self, IoSlice, Write};
    use std::os::fd::{AsFd, OwnedFd};
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, OnceLock, RwLock};
    use std::task::{Context, Poll, ready};

    use bytes::Bytes;
    use rustix::fs::{MemfdFlags, SealFlags};
    use rustix::mm::{MapFlags, ProtFlags};
    use rustix::net::SendFlags;
    use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
    use tokio::net::{TcpListener, TcpStream};

    use super::mapped_cap;

    /// A registered mapping: where it starts and how long it is, and its `memfd`.
    struct Region {
        len: usize,
        fd: Arc<OwnedFd>,
    }

    /// Live mappings by start address. Written when a large answer is cached or dropped (rare),
    /// read on every write of a connection (cheap: one uncontended read lock and a tree lookup).
    static REGIONS: RwLock<BTreeMap<usize, Region>> = RwLock::new(BTreeMap::new());
    /// Mappings alive, for the cap and to skip the lookup when there are none.
    static MAPPED: AtomicUsize = AtomicUsize::new(0);

    /// The owner of one mapping, kept alive by the [`Bytes`] that point into it.
    struct Mapping {
        ptr: *const u8,
        len: usize,
    }

    // SAFETY: the mapping is read-only and never changes (its memfd is sealed), so sharing the
    // pointer between threads is sharing immutable bytes.
    unsafe impl Send for Mapping {}
    unsafe impl Sync for Mapping {}

    impl AsRef<[u8]> for Mapping {
        fn as_ref(&self) -> &[u8] {
            // SAFETY: `ptr` is a live PROT_READ mapping of exactly `len` bytes of a file sealed
            // against writes and shrinking; it is unmapped only in `drop`.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            REGIONS
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(self.ptr as usize));
            // SAFETY: no `Bytes` points into the mapping any more (this is their owner), and it
            // was just unregistered, so no connection can look it up again.
            let _ = unsafe { rustix::mm::munmap(self.ptr as *mut _, self.len) };
            MAPPED.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The open-file soft limit now (`None`: unlimited).
    fn open_file_limit() -> Option<u64> {
        rustix::process::getrlimit(rustix::process::Resource::Nofile).current
    }

    /// Raises the open-file soft limit to the hard limit; returns the soft limit in force.
    pub fn raise_open_file_limit() -> Option<u64> {
        use rustix::process::{Resource, setrlimit};
        let limit = rustix::process::getrlimit(Resource::Nofile);
        if limit.current != limit.maximum {
            let raised = rustix::process::Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            };
            if let Err(e) = setrlimit(Resource::Nofile, raised) {
                tracing::debug!(error = %e, "open-file limit not raised");
            }
        }
        open_file_limit()
    }

    /// The cap on mapped bodies, from the open-file limit when the first body is mapped (after
    /// [`raise_open_file_limit`] at start).
    fn cap() -> usize {
        static CAP: OnceLock<usize> = OnceLock::new();
        *CAP.get_or_init(|| mapped_cap(open_file_limit()))
    }

    pub fn map(data: Vec<u8>) -> Bytes {
        if MAPPED.fetch_add(1, Ordering::Relaxed) >= cap() {
            MAPPED.fetch_sub(1, Ordering::Relaxed);
            return Bytes::from(data);
        }
        match sealed_mapping(&data) {
            Ok(bytes) => bytes,
            Err(e) => {
                MAPPED.fetch_sub(1, Ordering::Relaxed);
                tracing::debug!(error = %e, len = data.len(), "answer kept on the heap");
                Bytes::from(data)
            }
        }
    }

    /// Writes `data` into a new memfd, seals it, maps it read-only and registers the mapping.
    fn sealed_mapping(data: &[u8]) -> io::Result<Bytes> {
        let fd = rustix::fs::memfd_create(
            "oci-tag-proxy-answer",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        let mut file = std::fs::File::from(fd);
        file.write_all(data)?;
        let fd = OwnedFd::from(file);
        rustix::fs::fcntl_add_seals(
            &fd,
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
        )?;
        // SAFETY: a fresh shared read-only mapping of a file we own; nothing else is mapped at
        // the address the kernel picks.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                data.len(),
                ProtFlags::READ,
                MapFlags::SHARED,
                &fd,
                0,
            )?
        } as *const u8;
        REGIONS.write().unwrap_or_else(|e| e.into_inner()).insert(
            ptr as usize,
            Region {
                len: data.len(),
                fd: Arc::new(fd),
            },
        );
        Ok(Bytes::from_owner(Mapping {
            ptr,
            len: data.len(),
        }))
    }

    /// The memfd and offset behind `buf` when it lies wholly inside a registered mapping.
    fn lookup(buf: &[u8]) -> Option<(Arc<OwnedFd>, u64)> {
        if buf.is_empty() || MAPPED.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let addr = buf.as_ptr() as usize;
        let regions = REGIONS.read().unwrap_or_else(|e| e.into_inner());
        let (start, region) = regions.range(..=addr).next_back()?;
        (addr + buf.len() <= start + region.len).then(|| (region.fd.clone(), (addr - start) as u64))
    }

    pub fn is_mapped(buf: &[u8]) -> bool {
        lookup(buf).is_some()
    }

    /// Serves `listener`'s connections as [`Connection`]s.
    pub fn listen(listener: TcpListener) -> Listener {
        Listener(listener)
    }

    /// The server's listener: accepts TCP connections as [`Connection`]s, with `TCP_NODELAY`
    /// (answers are written whole, so Nagle's algorithm could only delay their last segment).
    pub struct Listener(pub TcpListener);

    impl axum::serve::Listener for Listener {
        type Io = Connection;
        type Addr = std::net::SocketAddr;

        async fn accept(&mut self) -> (Connection, Self::Addr) {
            let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
            (Connection(stream), addr)
        }

        fn local_addr(&self) -> io::Result<Self::Addr> {
            self.0.local_addr()
        }
    }

    /// A client connection that sends mapped bodies with `sendfile`.
    pub struct Connection(TcpStream);

    impl Connection {
        fn poll_sendfile(
            &self,
            cx: &mut Context<'_>,
            fd: &OwnedFd,
            mut offset: u64,
            len: usize,
        ) -> Poll<io::Result<usize>> {
            loop {
                ready!(self.0.poll_write_ready(cx))?;
                let sent = self.0.try_io(Interest::WRITABLE, || {
                    Ok(rustix::fs::sendfile(&self.0, fd, Some(&mut offset), len)?)
                });
                match sent {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    other => return Poll::Ready(other),
                }
            }
        }

        /// Writes `bufs` (none of them mapped), telling the kernel that more data follows.
        fn poll_send_more(
            &self,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            loop {
                ready!(self.0.poll_write_ready(cx))?;
                let sent = self.0.try_io(Interest::WRITABLE, || {
                    Ok(rustix::net::sendmsg(
                        self.0.as_fd(),
                        bufs,
                        &mut Default::default(),
                        SendFlags::MORE | SendFlags::NOSIGNAL,
                    )?)
                });
                match sent {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    other => return Poll::Ready(other),
                }
            }
        }
    }

    impl AsyncRead for Connection {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Connection {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            match lookup(buf) {
                Some((fd, offset)) => self.poll_sendfile(cx, &fd, offset, buf.len()),
                None => Pin::new(&mut self.0).poll_write(cx, buf),
            }
        }

        /// Writes the buffers up to the first mapped one with `writev` (with `MSG_MORE` when a
        /// mapped one follows), or the first buffer with `sendfile` when it is mapped. A short
        /// count is normal for `write`; hyper calls again with the rest.
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mapped = bufs.iter().position(|b| lookup(b).is_some());
            match mapped {
                None => Pin::new(&mut self.0).poll_write_vectored(cx, bufs),
                Some(0) => {
                    let (fd, offset) = lookup(&bufs[0]).expect("looked up just now");
                    self.poll_sendfile(cx, &fd, offset, bufs[0].len())
                }
                Some(i) => self.poll_send_more(cx, &bufs[..i]),
            }
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::{MAX_MAPPED, MIN_MAPPED_LEN, freeze, is_mapped};
        use super::*;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        fn pattern(len: usize) -> Vec<u8> {
            (0..len).map(|i| (i % 251) as u8).collect()
        }

        #[test]
        fn large_bodies_are_mapped_small_ones_are_not() {
            let big = freeze(pattern(MIN_MAPPED_LEN + 1));
            assert!(is_mapped(&big));
            assert_eq!(&big[..], &pattern(MIN_MAPPED_LEN + 1)[..]);
            assert!(
                is_mapped(&big.slice(100..200)),
                "a slice is inside the mapping"
            );
            let small = freeze(pattern(100));
            assert!(!is_mapped(&small));
            let heap = pattern(MIN_MAPPED_LEN + 1);
            assert!(!is_mapped(&heap));
        }

        #[test]
        fn the_cap_leaves_three_quarters_of_the_descriptors_to_connections() {
            assert_eq!(mapped_cap(Some(1024)), 256);
            assert_eq!(mapped_cap(Some(1_048_576)), MAX_MAPPED);
            assert_eq!(mapped_cap(None), MAX_MAPPED);
            assert_eq!(mapped_cap(Some(3)), 0);
            assert!(cap() <= MAX_MAPPED);
        }

        #[test]
        fn dropping_the_last_bytes_unregisters_the_mapping() {
            let big = freeze(pattern(MIN_MAPPED_LEN * 2));
            let addr = big.as_ptr() as usize;
            let clone = big.slice(10..);
            drop(big);
            assert!(is_mapped(&clone), "a clone keeps it alive");
            drop(clone);
            let regions = REGIONS.read().unwrap();
            assert!(!regions.contains_key(&addr));
        }

        /// Headers and a mapped body in one vectored write, then the rest of the body from an
        /// offset (as hyper does after a short write), arrive byte for byte.
        #[tokio::test]
        async fn connection_sends_mapped_and_heap_buffers_in_order() {
            let mut listener = Listener(TcpListener::bind("127.0.0.1:0").await.unwrap());
            let addr = listener.0.local_addr().unwrap();
            let client = tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                got
            });
            let (mut conn, _) = axum::serve::Listener::accept(&mut listener).await;
            let body = freeze(pattern(300_000));
            let mut expected = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
            expected.extend_from_slice(&body);
            expected.extend_from_slice(b"tail");
            expected.extend_from_slice(&body[1000..5000]);
            let mut parts: Vec<Bytes> = vec![
                Bytes::from_static(b"HTTP/1.1 200 OK\r\n\r\n"),
                body.clone(),
                Bytes::from_static(b"tail"),
                body.slice(1000..5000),
            ];
            while !parts.is_empty() {
                let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
                let mut n = conn.write_vectored(&slices).await.unwrap();
                assert!(n > 0);
                while n > 0 {
                    let first = &mut parts[0];
                    let take = n.min(first.len());
                    let _ = first.split_to(take);
                    n -= take;
                    if first.is_empty() {
                        parts.remove(0);
                    }
                }
            }
            conn.shutdown().await.unwrap();
            drop(conn);
            assert_eq!(client.await.unwrap(), expected);
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use bytes::Bytes;

    /// Elsewhere the server uses the plain `TcpListener`.
    pub type Listener = tokio::net::TcpListener;

    pub fn listen(listener: Listener) -> Listener {
        listener
    }

    pub fn map(data: Vec<u8>) -> Bytes {
        Bytes::from(data)
    }

    pub fn raise_open_file_limit() -> Option<u64> {
        None
    }

    pub fn is_mapped(_: &[u8]) -> bool {
        false
    }
}
