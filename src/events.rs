//! What a running transfer tells a program that embeds it: connections up
//! and down, bytes delivered, feet sent again. The engine never waits on
//! the program: events go into a bounded channel, and when it is full the
//! newest are dropped (progress is cumulative, so the next one catches up).

use crossbeam_channel::{Receiver, Sender};

/// Events a channel holds before new ones are dropped.
pub const CAPACITY: usize = 1024;

/// One thing that happened in a running transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A connection to (sender) or from (receiver) `peer` is up.
    Connected {
        /// The other end's address.
        peer: String,
    },
    /// That connection went down; the feet it carried go again on others.
    Disconnected {
        /// The other end's address.
        peer: String,
        /// Why.
        why: String,
    },
    /// Payload bytes so far: on a sender, the ones the receiver wrote; on a
    /// receiver, the ones it wrote to the flow.
    Progress {
        /// Bytes in all.
        bytes: u64,
    },
    /// Feet sent again so far (a sender's), after a connection was lost
    /// or found stalled.
    Retransmits {
        /// In all.
        total: u64,
    },
    /// A receiver took a new sender's stream (`Receiver::events`).
    FlowOpened {
        /// The name its sender gave, if any.
        name: Option<String>,
        /// Where its first connection came from.
        peer: String,
    },
    /// One of a receiver's flows ended (`Receiver::events`).
    FlowClosed {
        /// The name its sender gave, if any.
        name: Option<String>,
        /// Bytes written to it.
        bytes: u64,
        /// Why it failed; `None` when every byte arrived.
        error: Option<String>,
    },
}

/// Where the engine puts its events: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Sink(Sender<Event>);

impl Sink {
    /// A sink and the channel it feeds.
    pub fn new() -> (Sink, Receiver<Event>) {
        let (tx, rx) = crossbeam_channel::bounded(CAPACITY);
        (Sink(tx), rx)
    }

    /// Hands `event` over, or drops it if the program is behind.
    pub fn send(&self, event: Event) {
        let _ = self.0.try_send(event);
    }
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sink")
    }
}

impl PartialEq for Sink {
    fn eq(&self, other: &Sink) -> bool {
        self.0.same_channel(&other.0)
    }
}

impl Eq for Sink {}

/// Sends to `sink`, if there is one.
pub fn tell(sink: &Option<Sink>, event: impl FnOnce() -> Event) {
    if let Some(s) = sink {
        s.send(event());
    }
}
