//! `request`'s reply subjects: `_SB_INBOX.<client>.<correlation id>.<deadline>.<pattern>`.
//!
//! Replies arrive on one wildcard subscription per client (`_SB_INBOX.<client>.>`) and are
//! matched by the correlation id in their subject; the server's no-responders notice, which
//! carries nothing else, names the request and its pattern the same way. The request's id
//! (its correlation id, unless the caller chose another) and its deadline travel in that
//! subject too, so an SDK request needs no headers: the handler reads both from the reply
//! subject, as it reads a `send`'s deadline from `_SB_SEND.` subjects.

use std::time::SystemTime;

use switchboard_core::CorrelationId;

use crate::mux::deadline_token;

/// First part of every `request` reply subject.
pub(crate) const INBOX_PREFIX: &str = "_SB_INBOX.";

/// A deadline read from a reply subject: none, one, or a token that is not a number.
pub(crate) type Deadline = Option<std::result::Result<SystemTime, String>>;

/// The deadline token of a request without one.
const NO_DEADLINE: &str = "-";

/// `<inbox>.<correlation>.<deadline ms, or ->.<pattern>`, in one exact allocation.
pub(crate) fn reply_subject(
    inbox: &str,
    correlation: CorrelationId,
    deadline: Option<SystemTime>,
    pattern: &str,
) -> String {
    let mut id = [0u8; 36];
    let id = correlation.encode(&mut id);
    let mut digits = itoa::Buffer::new();
    let deadline = deadline.map_or(NO_DEADLINE, |d| {
        digits.format(switchboard_core::envelope::system_time_to_millis(d))
    });
    let mut subject =
        String::with_capacity(inbox.len() + id.len() + deadline.len() + pattern.len() + 3);
    for part in [inbox, ".", id, ".", deadline, ".", pattern] {
        subject.push_str(part);
    }
    subject
}

/// What a handler reads from a `request`'s reply subject: its correlation id (also its id,
/// unless a `ce-id` header says otherwise) and its deadline (`Some(Err)` naming a token that
/// is not a number of milliseconds). `None` for any other reply subject.
pub(crate) fn read_reply_subject(reply: &str) -> Option<(Option<CorrelationId>, Deadline)> {
    let rest = reply.strip_prefix(INBOX_PREFIX)?;
    let (_client, rest) = rest.split_once('.')?;
    let (correlation, rest) = rest.split_once('.')?;
    let (deadline, _pattern) = rest.split_once('.')?;
    let correlation = correlation.parse::<CorrelationId>().ok();
    let deadline = (deadline != NO_DEADLINE).then(|| deadline_token(deadline, reply));
    Some((correlation, deadline))
}

/// The correlation id and pattern of a reply subject, given the part after `<inbox>.`.
pub(crate) fn reply_parts(rest: &str) -> (&str, &str) {
    let (correlation, rest) = rest.split_once('.').unwrap_or_default();
    let pattern = rest.split_once('.').map_or("", |(_, pattern)| pattern);
    (correlation, pattern)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn a_request_s_id_and_deadline_travel_in_its_reply_subject() {
        let correlation = CorrelationId::new();
        let deadline = UNIX_EPOCH + Duration::from_millis(1_732_000_000_123);
        let subject = reply_subject("_SB_INBOX.c1", correlation, Some(deadline), "users.get");
        assert_eq!(
            subject,
            format!("_SB_INBOX.c1.{correlation}.1732000000123.users.get")
        );
        assert_eq!(subject.capacity(), subject.len(), "one exact allocation");
        assert_eq!(
            read_reply_subject(&subject),
            Some((Some(correlation), Some(Ok(deadline))))
        );
        let rest = subject.strip_prefix("_SB_INBOX.c1.").expect("prefix");
        assert_eq!(
            reply_parts(rest),
            (correlation.to_string().as_str(), "users.get")
        );

        let none = reply_subject("_SB_INBOX.c1", correlation, None, "p");
        assert_eq!(read_reply_subject(&none), Some((Some(correlation), None)));

        // A token that is not a number is an error naming it; a bad id is no id.
        let (id, deadline) =
            read_reply_subject("_SB_INBOX.c1.not-an-id.soon.p").expect("an inbox subject");
        assert_eq!(id, None);
        let err = deadline
            .expect("a deadline token")
            .expect_err("not a number");
        assert!(err.contains("`soon`"), "{err}");
        // Other reply subjects carry neither.
        assert_eq!(read_reply_subject("_SB_SEND.c.1.2"), None);
        assert_eq!(read_reply_subject("_SB_INBOX.c1"), None);
        assert_eq!(reply_parts("garbage"), ("", ""));
    }
}
