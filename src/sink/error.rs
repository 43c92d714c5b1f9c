//! What a memcached failure means for the caller: retry the exchange, or
//! give up on one entry and carry on with the rest.

use memcache::exp::{Error as McError, MutationStatus};

/// How a failure is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The link or the server failed as a whole (connection refused or
    /// reset, timeout, a garbled or out-of-order answer, an outcome that is
    /// unknown): nothing says the entry itself is at fault. The exchange is
    /// retried with backoff, and the state counts as possibly lost.
    Retriable,
    /// The server (or the client library, before sending) refused this one
    /// entry: `SERVER_ERROR object too large for cache`, `SERVER_ERROR out
    /// of memory storing object`, `CLIENT_ERROR` about the command, a key
    /// the protocol cannot carry, a set that was not stored. Sending it
    /// again cannot help: the entry is rejected, and every other entry is
    /// still written.
    Permanent,
}

/// Classifies an error of the memcache client about one operation.
pub fn classify(e: &McError) -> ErrorClass {
    match e {
        // The server answered this operation with an error line.
        McError::Server(_) | McError::Rejected(_) => ErrorClass::Permanent,
        // Refused by the client library before anything was written.
        McError::Usage(_) | McError::EmptyValue | McError::Encode(_) => ErrorClass::Permanent,
        // Written, then the server's answer was an error line: the server
        // saw the command and refused it.
        McError::Ambiguous { source, .. } => match source.as_ref() {
            McError::Server(_) | McError::Rejected(_) => ErrorClass::Permanent,
            _ => ErrorClass::Retriable,
        },
        McError::Io(_) | McError::Timeout { .. } | McError::Protocol(_) => ErrorClass::Retriable,
        // Not produced by the operations the sink sends; new variants of
        // the (non-exhaustive) enum are treated as link problems.
        _ => ErrorClass::Retriable,
    }
}

/// A mutation the server answered without applying it (`NS`, `EX`, ...):
/// a plain set or delete never asks for a condition, so this is the
/// server's verdict on the entry.
pub fn classify_status(_status: MutationStatus) -> ErrorClass {
    ErrorClass::Permanent
}

/// The text of a refusal, without the client library's wrapping.
pub fn reason(e: &McError) -> String {
    match e {
        McError::Server(m) => format!("SERVER_ERROR {m}"),
        McError::Rejected(m) => format!("CLIENT_ERROR {m}"),
        McError::Ambiguous { source, .. } => reason(source),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let io = || McError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(classify(&io()), ErrorClass::Retriable);
        assert_eq!(classify(&McError::Timeout { key: b"k".to_vec() }), ErrorClass::Retriable);
        assert_eq!(classify(&McError::Protocol("x".into())), ErrorClass::Retriable);
        assert_eq!(classify(&McError::Ambiguous { key: b"k".to_vec(), source: Box::new(io()) }), ErrorClass::Retriable);
        let too_large = McError::Server("object too large for cache".into());
        assert_eq!(classify(&too_large), ErrorClass::Permanent);
        assert_eq!(reason(&too_large), "SERVER_ERROR object too large for cache");
        let landed = McError::Ambiguous { key: b"k".to_vec(), source: Box::new(too_large) };
        assert_eq!(classify(&landed), ErrorClass::Permanent);
        assert_eq!(reason(&landed), "SERVER_ERROR object too large for cache");
        assert_eq!(classify(&McError::Rejected("bad command line format".into())), ErrorClass::Permanent);
        assert_eq!(classify(&McError::Usage("key too long")), ErrorClass::Permanent);
        assert_eq!(classify_status(MutationStatus::NotFound), ErrorClass::Permanent);
    }
}
