//! `send`s over one `SendStream` per transport: each call is a message on a stream opened once,
//! not an HTTP/2 stream of its own (headers, stream set-up and a task on the server per call),
//! and is matched to its outcome by a number. The stream is opened at the first `send` and
//! again after it ends; a server without `SendStream` gets unary `Send`s.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use switchboard_core::envelope::IdHash;
use switchboard_core::transport::CloseSignal;
use switchboard_core::{CorrelationId, Envelope, Error, ErrorKind, Result};
use switchboard_proto::{pb, read_stream_reply};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use crate::NAME;
use crate::status::{from_call_status, to_error};

/// Calls waiting to be written to the stream (beyond them, a `send` waits for room, within
/// its deadline).
const QUEUED_CALLS: usize = 1024;

/// The calls a stream carries, as its request body.
pub(crate) type Calls = ReceiverStream<pb::SendCall>;

/// What a call gets back: the reply, or the status a unary `Send` would have ended with.
pub(crate) type Outcome = std::result::Result<Envelope, Status>;

/// The transport's `SendStream`, opened when first needed.
#[derive(Default)]
pub(crate) struct Lanes {
    current: RwLock<Option<Arc<Lane>>>,
    /// Held while a stream is being opened, so concurrent first calls open one.
    opening: tokio::sync::Mutex<()>,
    /// The server answered `SendStream` with UNIMPLEMENTED: unary calls only.
    unary_only: AtomicBool,
}

/// One open `SendStream`.
pub(crate) struct Lane {
    calls: mpsc::Sender<pb::SendCall>,
    waiters: DashMap<u64, oneshot::Sender<pb::SendOutcome>, IdHash>,
    next: AtomicU64,
    /// Closed when the stream ended: calls waiting fail, the next call opens a new stream.
    ended: CloseSignal,
}

/// Removes a call's waiter if the call ends without its outcome.
struct Waiting<'a> {
    lane: &'a Lane,
    call: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.lane.waiters.remove(&self.call);
    }
}

fn ended_error() -> Error {
    Error::new(
        ErrorKind::Connection,
        NAME,
        "the stream of sends to the server ended while waiting for the reply; the request may or may not have been handled",
    )
}

impl Lanes {
    /// The open stream, opened now if there is none; `None` if the server has no
    /// `SendStream`.
    ///
    /// `request` makes the call's request (with the transport's token) from its body.
    ///
    /// # Errors
    /// Those of opening the stream (the server unreachable, the token refused).
    pub(crate) async fn lane(
        &self,
        rpc: &crate::transport::Rpc,
        request: impl FnOnce(Calls) -> tonic::Request<Calls> + Send,
        closed: &CloseSignal,
    ) -> Result<Option<Arc<Lane>>> {
        match self.open_lane() {
            Some(lane) => Ok(Some(lane)),
            None if self.unary_only.load(Ordering::Relaxed) => Ok(None),
            // Boxed: opening is rare, and its future (tonic's call among it) is large; inline,
            // it would make every call's future as large.
            None => Box::pin(self.open(rpc, request, closed)).await,
        }
    }

    async fn open(
        &self,
        rpc: &crate::transport::Rpc,
        request: impl FnOnce(Calls) -> tonic::Request<Calls> + Send,
        closed: &CloseSignal,
    ) -> Result<Option<Arc<Lane>>> {
        let _opening = self.opening.lock().await;
        if let Some(lane) = self.open_lane() {
            return Ok(Some(lane));
        }
        let (tx, rx) = mpsc::channel(QUEUED_CALLS);
        let outcomes = match rpc
            .clone()
            .send_stream(request(ReceiverStream::new(rx)))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::Unimplemented => {
                tracing::debug!("the server has no SendStream; sends are unary calls");
                self.unary_only.store(true, Ordering::Relaxed);
                return Ok(None);
            }
            Err(s) => return Err(to_error(&s)),
        };
        let lane = Arc::new(Lane {
            calls: tx,
            waiters: DashMap::default(),
            next: AtomicU64::new(0),
            ended: CloseSignal::new(),
        });
        tokio::spawn(read_outcomes(lane.clone(), outcomes, closed.clone()));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(lane.clone());
        Ok(Some(lane))
    }

    fn open_lane(&self) -> Option<Arc<Lane>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|l| !l.ended.is_closed())
            .cloned()
    }

    /// Ends the open stream (the transport closes): calls still waiting fail at once.
    pub(crate) fn close(&self) {
        if let Some(lane) = self
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            lane.ended.close();
        }
    }
}

impl Lane {
    /// One call: `envelope` written to the stream, its outcome awaited until `deadline`, its
    /// reply read with the call's `correlation` ([`read_stream_reply`]).
    ///
    /// # Errors
    /// `Timeout` at the deadline; `Connection` if the stream ends first.
    pub(crate) async fn call(
        &self,
        envelope: pb::Envelope,
        correlation: Option<CorrelationId>,
        deadline: Instant,
        left: std::time::Duration,
    ) -> Result<Outcome> {
        let call = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(call, tx);
        let _waiting = Waiting { lane: self, call };
        // The reader marks the stream ended before it lets go of the waiters: a waiter
        // added after that is seen here, one added before is let go by the reader.
        if self.ended.is_closed() {
            return Err(ended_error());
        }
        let sent = self.calls.send_timeout(
            pb::SendCall {
                call,
                envelope: Some(envelope),
            },
            deadline.saturating_duration_since(Instant::now()),
        );
        match sent.await {
            Ok(()) => {}
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                return Err(Error::timeout(NAME, left));
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => return Err(ended_error()),
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(o)) => Ok(match (o.reply, o.error) {
                (_, Some(e)) => Err(from_call_status(e)),
                (Some(reply), None) => Ok(read_stream_reply(reply, correlation)?),
                (None, None) => {
                    return Err(Error::codec(
                        NAME,
                        "the server's outcome has neither a reply nor an error",
                    ));
                }
            }),
            Ok(Err(_)) => Err(ended_error()),
            Err(_) => Err(Error::timeout(NAME, left)),
        }
    }
}

/// Hands each outcome to its call until the stream ends (or the transport closes); then
/// every call still waiting fails at once. The outcome of a call that stopped waiting (its
/// deadline passed here first; the server's own answer for it is then a timeout too) is
/// dropped, as a unary call's would be.
async fn read_outcomes(
    lane: Arc<Lane>,
    mut outcomes: Streaming<pb::SendOutcome>,
    closed: CloseSignal,
) {
    loop {
        tokio::select! {
            m = outcomes.message() => match m {
                Ok(Some(o)) => {
                    if let Some((_, tx)) = lane.waiters.remove(&o.call) {
                        let _ = tx.send(o);
                    }
                }
                Ok(None) => break,
                Err(s) => {
                    tracing::debug!(status = %s, "the stream of sends ended with an error");
                    break;
                }
            },
            () = lane.ended.closed() => break,
            () = closed.closed() => break,
        }
    }
    lane.ended.close();
    lane.waiters.clear();
}
