//! Progress reports, the final summary and cancellation (M7).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Where a migration is. A failure names the stage it happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Connecting and exchanging `Hello`.
    Connect,
    /// Waiting for the target's pre-checks.
    Precheck,
    /// Copying memory while the guest runs; round 0 is the full copy.
    Precopy {
        /// Round number.
        round: u32,
    },
    /// Guest paused on the source; sending the last dirty pages.
    Stun,
    /// Sending state and waiting for the target's ack.
    Switchover,
    /// The target runs the guest.
    Done,
    /// The migration failed; the source VM runs. Only in the last progress
    /// report; the error names the stage where it happened.
    Failed,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stage::Connect => write!(f, "connect"),
            Stage::Precheck => write!(f, "precheck"),
            Stage::Precopy { round } => write!(f, "precopy round {round}"),
            Stage::Stun => write!(f, "stun"),
            Stage::Switchover => write!(f, "switchover"),
            Stage::Done => write!(f, "done"),
            Stage::Failed => write!(f, "failed"),
        }
    }
}

/// One progress report, sent to the caller's callback at each step.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Current stage.
    pub stage: Stage,
    /// 0..=100; 100 only when done.
    pub percent: u8,
    /// Bytes written to the connection so far.
    pub bytes_sent: u64,
    /// Pages the guest dirtied per second, last measured.
    pub dirty_pages_per_sec: f64,
    /// Measured link bandwidth, bytes per second.
    pub bandwidth: f64,
    /// Dirty pages still to send.
    pub remaining_pages: u64,
    /// Expected downtime if we stunned now.
    pub expected_downtime: Duration,
    /// Current vCPU throttle (auto-converge), percent.
    pub throttle: u8,
}

/// What a finished migration did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// From start to the target's ack.
    pub total: Duration,
    /// Measured at the source: pause to the target's `Resumed` ack.
    pub downtime: Duration,
    /// Pause to the last byte of `Complete` written: the part of the
    /// downtime spent on the source and the wire, without the target's
    /// restore, start and ack (what QEMU reports as its downtime).
    pub downtime_sent: Duration,
    /// Bytes written to the connection.
    pub bytes_sent: u64,
    /// Pre-copy rounds, the full copy and the stunned round included.
    pub rounds: u32,
    /// Pages sent with data.
    pub data_pages: u64,
    /// Pages announced as zero.
    pub zero_pages: u64,
    /// Highest throttle applied.
    pub max_throttle: u8,
    /// Pages sent in the stunned round.
    pub last_round_pages: u64,
    /// Bytes written by the full first pass over guest memory.
    pub first_pass_bytes: u64,
    /// How long the full first pass took to write: with
    /// `first_pass_bytes`, the stream's throughput.
    pub first_pass: Duration,
}

/// Cancels a migration from any thread; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks the migration to stop; it resumes the source and returns
    /// `Cancelled` unless the target already acknowledged.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
