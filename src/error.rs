//! The program's error type and exit codes.

use std::fmt;
use std::io;

/// What a run of viamillipede ends with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCode {
    /// Every byte was written by the receiver.
    Success = 0,
    /// The transfer failed (I/O, network, the peer).
    Failure = 1,
    /// The command line was wrong.
    Usage = 2,
}

/// Everything that can end a transfer early, with the context a user needs.
#[derive(Debug)]
pub enum Error {
    /// The command line is wrong.
    Usage(String),
    /// An operation on a file, pipe or socket failed.
    Io {
        /// What was being done (`read stdin`, `listen on [::]:8834`).
        context: String,
        /// The operating system's error.
        source: io::Error,
    },
    /// The peer refused or aborted the stream; the message is the peer's.
    Peer(String),
    /// No connection could be (re)established in time.
    GaveUp(String),
    /// A thread of this program panicked.
    Internal(String),
    /// The data did not match what was expected (prbs).
    Mismatch(String),
    /// The sender stopped the stream; the message is the sender's.
    Sender(String),
    /// Stopped by this signal (SIGINT, SIGTERM).
    Interrupted(i32),
    /// The program using the library aborted the stream, for this reason.
    Aborted(String),
    /// The far side of `viamillipede ssh` (ssh, the far viamillipede or the
    /// command it ran) failed; the message says which.
    Remote(String),
    /// What the stream was written to would not take it (a command given
    /// the stream by `--exec` exited non-zero); the message says how.
    Output(String),
}

impl Error {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The exit status this error maps to: 2 for usage, 128 + the signal
    /// for a stop by signal (as shells report it), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => ExitCode::Usage as u8,
            Error::Interrupted(sig) => 128u8.saturating_add(*sig as u8),
            _ => ExitCode::Failure as u8,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m)
            | Error::GaveUp(m)
            | Error::Internal(m)
            | Error::Mismatch(m)
            | Error::Remote(m)
            | Error::Output(m) => f.write_str(m),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Peer(m) => write!(f, "receiver: {m}"),
            Error::Sender(m) => write!(f, "sender: {m}"),
            Error::Interrupted(sig) => write!(f, "stopped by {}", signal_name(*sig)),
            Error::Aborted(m) => write!(f, "aborted: {m}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The name of a stop signal, for messages.
pub fn signal_name(sig: i32) -> String {
    match sig {
        signal_hook::consts::SIGINT => "SIGINT".into(),
        signal_hook::consts::SIGTERM => "SIGTERM".into(),
        other => format!("signal {other}"),
    }
}

/// A string a peer sent, fit to show on a terminal: control characters
/// (escape sequences, carriage returns) are escaped, so a peer cannot
/// rewrite what the user sees.
pub fn shown(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            c if c.is_control() => c.escape_default().collect::<String>(),
            c => c.to_string(),
        })
        .collect()
}

/// The result of a run.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    #[test]
    fn peer_strings_lose_their_control_characters() {
        assert_eq!(super::shown("busy\x1b[2J\r\nok"), "busy\\u{1b}[2J\\r\\nok");
        assert_eq!(super::shown("plain é text"), "plain é text");
    }
}
