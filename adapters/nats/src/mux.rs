//! `send`'s replies: one wildcard subscription per connection (`_SB_SEND.<id>.>`), a reply
//! subject per call (`_SB_SEND.<id>.<sequence>.<deadline>`), and a sharded map from sequence
//! to waiter.
//!
//! The call's deadline travels as the last token of its reply subject: the request needs no
//! header for it, and its subject stays the same for every call to a pattern (the server
//! matches a subject it has seen from its cache; a subject that changed every millisecond was
//! matched anew, and cost the server more CPU per request). The reply subject is new for every
//! call anyway.
//!
//! Requests sent while others wait go out through the multiplexer's flusher, a task that
//! hands a batch of them to the client at once: every request a burst of replies sets off
//! then reaches the connection's task before it writes, and goes out in one write. Each
//! caller handing its own request to the client would wake the connection's task, which
//! tokio runs right after the waker, so each would go out in a write of its own, and the
//! server would read each alone (`docs/benchmarks.md`, "NATS `send` requests in batches").
//! A request sent while no other waits is handed over by its caller: nothing could join its
//! batch, and the flusher would only add a task switch to its round trip.
//!
//! async-nats has such a multiplexer too (`Client::request`), but its call future is over a
//! kilobyte (it also holds the one-subscription-per-request variant), which made every `send`
//! take the allocator's slow path, and it drops replies that come too late unseen. This one
//! needs a small future, counts late replies, and its reply subjects are cheap to make (no
//! random token per call).

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::client::PublishError;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use dashmap::DashMap;
use futures::{FutureExt, StreamExt};
use switchboard_core::Result;
use switchboard_core::transport::{CloseSignal, Registered};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// First part of every `send` reply subject.
pub(crate) const SEND_INBOX_PREFIX: &str = "_SB_SEND.";

/// Hashes a sequence number by one multiplication (Fibonacci hashing): the map's shard and
/// bucket bits come out well spread, without a general-purpose hasher's per-call cost.
#[derive(Default)]
pub(crate) struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; other input is folded in all the same.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// What a call receives.
pub(crate) enum Answer {
    /// Its reply.
    Reply(async_nats::Message),
    /// The connection was lost while the call waited: the reply may never come.
    Lost,
    /// The flusher could not hand the request to the client.
    Unsent(PublishError),
}

type Waiters = DashMap<u64, oneshot::Sender<Answer>, BuildHasherDefault<SeqHasher>>;

/// A request for the flusher to hand to the client.
pub(crate) struct Outgoing {
    pub(crate) subject: Subject,
    /// The call's reply subject.
    pub(crate) reply: String,
    pub(crate) headers: HeaderMap,
    pub(crate) payload: Bytes,
    /// The call's sequence: whom to tell if the request cannot be handed over.
    pub(crate) seq: u64,
}

/// The multiplexer of one connection.
pub(crate) struct SendMux {
    /// `_SB_SEND.<id>.`: a reply subject is this, a sequence number and a deadline.
    prefix: String,
    next: AtomicU64,
    waiters: Waiters,
    /// Calls between their registration and their end, answered or not.
    calls: AtomicUsize,
    late: AtomicU64,
    /// Requests for the flusher. Unbounded, but never longer than the calls waiting: each
    /// queues one request and then waits for its reply.
    outbox: mpsc::UnboundedSender<Outgoing>,
}

/// Removes a call's waiter if the call ends without its reply (timeout, lost connection,
/// dropped): the map only holds calls still waiting. It borrows the multiplexer, as the call
/// borrows its transport: no reference count touched per call.
pub(crate) struct Waiting<'a> {
    mux: &'a SendMux,
    seq: u64,
    armed: bool,
}

impl Waiting<'_> {
    /// The reply came: the reader already removed the waiter.
    pub(crate) fn answered(mut self) {
        self.armed = false;
    }

    /// The call's sequence number.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether this is the only call of the connection in progress.
    pub(crate) fn alone(&self) -> bool {
        self.mux.calls.load(Ordering::Relaxed) == 1
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.mux.waiters.remove(&self.seq);
        }
        self.mux.calls.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The reader of a connection's replies and the flusher of its requests; both stop with the
/// connection.
pub(crate) struct MuxTasks([JoinHandle<()>; 2]);

impl Drop for MuxTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl SendMux {
    /// Subscribes to the replies of this connection (`id` makes its subjects its own), starts
    /// reading them, and starts the flusher of its requests. No round trip is needed before
    /// the first call: the server handles one connection's commands in order, so it has the
    /// subscription before any request the connection publishes after it. When `lost`
    /// changes (the connection dropped), every call waiting is answered `Lost` at once rather
    /// than left to its deadline.
    pub(crate) async fn start(
        client: &async_nats::Client,
        id: &str,
        closed: &CloseSignal,
        mut lost: watch::Receiver<u64>,
    ) -> Result<(Arc<SendMux>, MuxTasks)> {
        let prefix = format!("{SEND_INBOX_PREFIX}{id}.");
        let sub = client
            .subscribe(format!("{prefix}>"))
            .await
            .map_err(|e| crate::transport::conn_error("subscribe", e))?;
        let (outbox, outgoing) = mpsc::unbounded_channel();
        let mux = Arc::new(SendMux {
            prefix,
            next: AtomicU64::new(0),
            waiters: Waiters::default(),
            calls: AtomicUsize::new(0),
            late: AtomicU64::new(0),
            outbox,
        });
        // The flusher holds the multiplexer weakly: the multiplexer holds the outbox's sender,
        // and the transport's end aborts the task (`MuxTasks`).
        let flusher = tokio::spawn(flush(client.clone(), Arc::downgrade(&mux), outgoing));
        let reader = mux.clone();
        let mut replies = closed.guard(sub);
        let task = tokio::spawn(async move {
            // Watches for a lost connection while the replies keep coming; made anew only
            // after it fired, and polled only when no reply is ready.
            loop {
                // Registered once for this task, not again each time the replies run dry.
                let mut changed = Registered::new(lost.changed());
                let watching = loop {
                    tokio::select! {
                        biased;
                        m = replies.next() => match m {
                            Some(m) => reader.deliver(m),
                            None => return,
                        },
                        r = &mut changed => break r.is_ok(),
                    }
                };
                if !watching {
                    // The transport is gone; read what still comes until the stream ends.
                    while let Some(m) = replies.next().await {
                        reader.deliver(m);
                    }
                    return;
                }
                reader.fail_all();
            }
        });
        Ok((mux, MuxTasks([task, flusher])))
    }

    /// Answers every waiting call `Lost`: the connection was lost.
    fn fail_all(&self) {
        let seqs: Vec<u64> = self.waiters.iter().map(|e| *e.key()).collect();
        for seq in seqs {
            if let Some((_, tx)) = self.waiters.remove(&seq) {
                let _ = tx.send(Answer::Lost);
            }
        }
    }

    /// Queues a call's request for the flusher; `false` if the flusher is gone (the
    /// transport is ending).
    pub(crate) fn queue(&self, request: Outgoing) -> bool {
        self.outbox.send(request).is_ok()
    }

    /// Hands a reply to its call; counts it as late if nobody waits for it any more.
    fn deliver(&self, m: async_nats::Message) {
        let seq = m
            .subject
            .as_str()
            .strip_prefix(self.prefix.as_str())
            .and_then(leading_number);
        match seq.and_then(|s| self.waiters.remove(&s)) {
            Some((_, tx)) => {
                if tx.send(Answer::Reply(m)).is_err() {
                    // The call gave up between its last check and now.
                    self.late.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                self.late.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(subject = %m.subject, "late or unknown send reply dropped");
            }
        }
    }

    /// Registers a call: its reply subject (carrying `deadline`, if any), the receiver of its
    /// reply, and the guard that unregisters it if it ends unanswered (and counts it among
    /// the calls in progress until it ends).
    pub(crate) fn register(
        &self,
        deadline: Option<SystemTime>,
    ) -> (String, oneshot::Receiver<Answer>, Waiting<'_>) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
        let subject = reply_subject(&self.prefix, seq, deadline);
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(seq, tx);
        let waiting = Waiting {
            mux: self,
            seq,
            armed: true,
        };
        (subject, rx, waiting)
    }

    /// Replies that arrived for no waiting call.
    pub(crate) fn late_replies(&self) -> u64 {
        self.late.load(Ordering::Relaxed)
    }
}

/// Hands queued requests to the client in batches. Woken by the first request of a batch, it
/// yields once (tokio runs a yielded task again only after the tasks already queued), so the
/// callers woken with it queue theirs too; then it hands over all there are. The first wakes
/// the connection's task; it runs when the flusher is done, and writes them together. A
/// request the client refuses fails its call with the client's error.
async fn flush(
    client: async_nats::Client,
    mux: std::sync::Weak<SendMux>,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
) {
    const BATCH: usize = 256;
    let mut batch = Vec::with_capacity(BATCH);
    while outgoing.recv_many(&mut batch, BATCH).await > 0 {
        tokio::task::yield_now().await;
        while let room @ 1.. = BATCH.saturating_sub(batch.len())
            && outgoing
                .recv_many(&mut batch, room)
                .now_or_never()
                .is_some_and(|n| n > 0)
        {}
        for r in batch.drain(..) {
            if let Err(e) = client
                .publish_with_reply_and_headers(r.subject, r.reply, r.headers, r.payload)
                .await
                && let Some((_, tx)) = mux.upgrade().and_then(|m| m.waiters.remove(&r.seq))
            {
                let _ = tx.send(Answer::Unsent(e));
            }
        }
    }
}

/// `<prefix><seq>.<deadline in Unix ms>` (or `<prefix><seq>` without a deadline), in one exact
/// allocation.
fn reply_subject(prefix: &str, seq: u64, deadline: Option<SystemTime>) -> String {
    let mut seq_digits = itoa::Buffer::new();
    let n = seq_digits.format(seq);
    let mut ms_digits = itoa::Buffer::new();
    let ms =
        deadline.map(|d| ms_digits.format(switchboard_core::envelope::system_time_to_millis(d)));
    let mut subject =
        String::with_capacity(prefix.len() + n.len() + ms.map_or(0, |ms| 1 + ms.len()));
    subject.push_str(prefix);
    subject.push_str(n);
    if let Some(ms) = ms {
        subject.push('.');
        subject.push_str(ms);
    }
    subject
}

/// The deadline a `send`'s reply subject carries (`_SB_SEND.<connection>.<seq>.<deadline>`):
/// `None` for any other reply subject (a plain NATS client's inbox, a `request`'s), or one
/// without a deadline; `Some(Err)` naming the token when it is not a number of milliseconds.
pub(crate) fn deadline_in_reply(reply: &str) -> crate::inbox::Deadline {
    let rest = reply.strip_prefix(SEND_INBOX_PREFIX)?.as_bytes();
    // Read from the end, where the deadline is: its digits are summed as they are passed
    // (every request's subject is read here, so no second pass and no general parser).
    let (mut ms, mut scale, mut i) = (0u64, 1u64, rest.len());
    while i > 0 && rest[i - 1].is_ascii_digit() && rest.len() - i < 19 {
        i -= 1;
        ms += u64::from(rest[i] - b'0') * scale;
        scale = scale.wrapping_mul(10);
    }
    let digits = rest.len() - i;
    if digits > 0 && i > 0 && rest[i - 1] == b'.' {
        // `<connection>.<seq>` comes before the deadline (a subject with one dot carries
        // none); the sequence is short, so this scan is too.
        rest[..i - 1].iter().rposition(|&b| b == b'.')?;
        return Some(Ok(UNIX_EPOCH + Duration::from_millis(ms)));
    }
    // Anything else: the general reading, which names a token that is not a number.
    let last = rest.iter().rposition(|&b| b == b'.')?;
    rest[..last].iter().rposition(|&b| b == b'.')?;
    let token = &reply[reply.len() - (rest.len() - last - 1)..];
    Some(deadline_token(token, reply))
}

/// A deadline token of reply subject `reply`: Unix milliseconds, or an error naming it.
pub(crate) fn deadline_token(token: &str, reply: &str) -> std::result::Result<SystemTime, String> {
    millis(token)
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        .ok_or_else(|| {
            format!("deadline `{token}` in reply subject `{reply}` is not a number of milliseconds")
        })
}

/// A decimal number of up to 19 digits (all fit a u64), nothing else.
fn millis(token: &str) -> Option<u64> {
    if token.is_empty() || token.len() > 19 {
        return None;
    }
    token.bytes().try_fold(0u64, |n, b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// The number at the start of `s`, up to its first dot (a reply's sequence); `None` if that
/// is not a number that fits a u64.
fn leading_number(s: &str) -> Option<u64> {
    let end = s.bytes().position(|b| b == b'.').unwrap_or(s.len());
    millis(&s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A multiplexer on a connection to the NATS server of the tests (`SB_NATS_URL`, default
    /// `nats://127.0.0.1:4222`; `scripts/test` starts it), and the connection.
    async fn live_mux(id: &str) -> (async_nats::Client, Arc<SendMux>, MuxTasks, CloseSignal) {
        let url = std::env::var("SB_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        let client = tokio::time::timeout(
            Duration::from_secs(10),
            async_nats::connect(url.trim_start_matches("nats://")),
        )
        .await
        .expect("connects within 10 s")
        .unwrap_or_else(|e| panic!("these tests need the NATS server at {url}: {e}"));
        let closed = CloseSignal::new();
        let (_lost, lost) = watch::channel(0);
        let (mux, tasks) = SendMux::start(&client, id, &closed, lost)
            .await
            .expect("starts");
        (client, mux, tasks, closed)
    }

    async fn answer(rx: oneshot::Receiver<Answer>) -> Answer {
        tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("answered within 10 s")
            .expect("the waiter is kept until answered")
    }

    /// Requests queued while other calls wait go out through the flusher, each reply reaches
    /// its own call, and a request the client refuses fails its call with the client's error
    /// while the others in its batch go out.
    #[tokio::test]
    async fn queued_requests_reach_their_calls_and_a_refused_one_fails_its_call() {
        let id = format!("mux-test-{}", std::process::id());
        let (client, mux, _tasks, _closed) = live_mux(&id).await;
        let subject = format!("{id}.echo");
        let mut requests = client.subscribe(subject.clone()).await.expect("subscribes");
        client.flush().await.expect("flushed");
        let responder = client.clone();
        let echo = tokio::spawn(async move {
            while let Some(m) = requests.next().await {
                let reply = m.reply.expect("a reply subject");
                responder.publish(reply, m.payload).await.expect("replies");
            }
        });
        let calls: Vec<_> = (0..20u64).map(|_| mux.register(None)).collect();
        for (i, (reply, _, waiting)) in calls.iter().enumerate() {
            assert!(!waiting.alone(), "twenty calls wait");
            // One request in the batch names a subject the client refuses.
            let subject = if i == 7 {
                "not a subject".to_owned()
            } else {
                subject.clone()
            };
            assert!(mux.queue(Outgoing {
                subject: subject.into(),
                reply: reply.clone(),
                headers: HeaderMap::new(),
                payload: Bytes::from(i.to_string()),
                seq: waiting.seq(),
            }));
        }
        for (i, (_, rx, waiting)) in calls.into_iter().enumerate() {
            match answer(rx).await {
                Answer::Reply(m) if i != 7 => {
                    assert_eq!(&m.payload[..], i.to_string().as_bytes(), "call {i}");
                    waiting.answered();
                }
                Answer::Unsent(e) if i == 7 => assert_eq!(
                    e.kind(),
                    async_nats::client::PublishErrorKind::InvalidSubject,
                    "{e}"
                ),
                Answer::Reply(_) => panic!("call {i} was answered, its request was refused"),
                Answer::Unsent(e) => panic!("call {i} was not sent: {e}"),
                Answer::Lost => panic!("call {i}: connection lost"),
            }
        }
        let (_, _, only) = mux.register(None);
        assert!(only.alone(), "the calls that ended are no longer counted");
        assert_eq!(mux.late_replies(), 0);
        echo.abort();
    }

    #[test]
    fn a_deadline_travels_in_the_reply_subject() {
        let deadline = UNIX_EPOCH + Duration::from_millis(1_732_000_000_123);
        let subject = reply_subject("_SB_SEND.c1.", 7, Some(deadline));
        assert_eq!(subject, "_SB_SEND.c1.7.1732000000123");
        assert_eq!(subject.capacity(), subject.len(), "one exact allocation");
        assert_eq!(deadline_in_reply(&subject), Some(Ok(deadline)));
        assert_eq!(reply_subject("_SB_SEND.c1.", 0, None), "_SB_SEND.c1.0");
        assert_eq!(
            reply_subject("_SB_SEND.c1.", 1, Some(UNIX_EPOCH)),
            "_SB_SEND.c1.1.0",
            "zero is a digit too"
        );
        // The longest deadline token read (19 digits), and two dots in a row.
        assert_eq!(
            deadline_in_reply("_SB_SEND.c1.7.9999999999999999999"),
            Some(Ok(
                UNIX_EPOCH + Duration::from_millis(9_999_999_999_999_999_999)
            ))
        );
        assert_eq!(
            deadline_in_reply("_SB_SEND.c1..1732000000123"),
            Some(Ok(deadline))
        );
        // Other reply subjects, and one without a deadline, carry none.
        assert_eq!(deadline_in_reply("_SB_SEND.c1.7"), None);
        assert_eq!(deadline_in_reply("_INBOX.abc.def.1732000000123"), None);
        assert_eq!(deadline_in_reply("_SB_INBOX.c.id.users.get"), None);
        // A token that is not a number is an error that names it, not a panic.
        for bad in ["soon", "", "12a", "99999999999999999999999"] {
            let subject = format!("_SB_SEND.c1.7.{bad}");
            let err = deadline_in_reply(&subject)
                .expect("a send's reply subject")
                .expect_err(bad);
            assert!(err.contains(&format!("`{bad}`")), "{err}");
        }
        // The sequence a reply is matched by.
        assert_eq!(leading_number("7.1732000000123"), Some(7));
        assert_eq!(leading_number("7"), Some(7));
        assert_eq!(leading_number("x.1"), None);
        assert_eq!(leading_number(""), None);
        assert_eq!(leading_number("99999999999999999999999"), None);
    }
}
