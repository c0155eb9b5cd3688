//! Test-only fault injection (`fault-injection` feature): make the engine's Nth forward pass
//! return an error or panic, to prove that a failing engine ends every request with an error,
//! refuses new ones and reports itself unhealthy (vLLM's
//! `tests/v1/shutdown/test_forward_error.py` does the same by patching its model).
//!
//! Never compiled into a release binary built without the feature.

use std::str::FromStr;

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The forward pass returns an error (an out-of-memory, a driver error).
    ForwardError,
    /// The forward pass panics (a bug).
    ForwardPanic,
    /// The forward pass hangs this long, then goes on (a stuck kernel or driver call).
    ForwardStall {
        /// How long it hangs.
        ms: u64,
    },
    /// Every forward pass from this one on takes this much longer (a slow replica, for the
    /// canary analysis rehearsal: it must flag this replica and not the healthy ones).
    ForwardDelay {
        /// The latency added to each pass.
        ms: u64,
    },
}

/// A fault at the `at_forward`-th forward pass after warm-up (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// What goes wrong.
    pub kind: FaultKind,
    /// Which forward pass fails, counting from 1 after warm-up.
    pub at_forward: u32,
}

impl FromStr for Fault {
    type Err = String;

    /// `forward-error:N`, `forward-panic:N`, `forward-stall:N:MS` or `forward-delay:N:MS`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let usage = || {
            format!("a fault is forward-error:N, forward-panic:N, forward-stall:N:MS or forward-delay:N:MS (N >= 1), got `{text}`")
        };
        let mut fields = text.split(':');
        let (kind, at, ms) = (fields.next(), fields.next(), fields.next());
        if fields.next().is_some() {
            return Err(usage());
        }
        let kind = match (kind, ms) {
            (Some("forward-error"), None) => FaultKind::ForwardError,
            (Some("forward-panic"), None) => FaultKind::ForwardPanic,
            (Some("forward-stall"), Some(ms)) => FaultKind::ForwardStall {
                ms: ms.parse().map_err(|_| usage())?,
            },
            (Some("forward-delay"), Some(ms)) => FaultKind::ForwardDelay {
                ms: ms.parse().map_err(|_| usage())?,
            },
            _ => return Err(usage()),
        };
        let at_forward: u32 = at.ok_or_else(usage)?.parse().map_err(|_| usage())?;
        if at_forward == 0 {
            return Err(usage());
        }
        Ok(Self { kind, at_forward })
    }
}

/// Counts forward passes and fires the fault at its pass.
#[derive(Debug)]
pub(crate) struct FaultCounter {
    fault: Option<Fault>,
    forwards: u32,
}

impl FaultCounter {
    pub(crate) fn new(fault: Option<Fault>) -> Self {
        Self { fault, forwards: 0 }
    }

    /// Called before each forward pass after warm-up.
    pub(crate) fn before_forward(&mut self) -> Result<(), String> {
        self.forwards = self.forwards.saturating_add(1);
        let Some(fault) = self.fault else {
            return Ok(());
        };
        match fault.kind {
            FaultKind::ForwardDelay { ms } if self.forwards >= fault.at_forward => {
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(())
            }
            _ if self.forwards != fault.at_forward => Ok(()),
            FaultKind::ForwardError => Err(format!(
                "injected fault: forward pass {} failed",
                self.forwards
            )),
            FaultKind::ForwardPanic => {
                panic!("injected fault: forward pass {} panicked", self.forwards)
            }
            FaultKind::ForwardStall { ms } => {
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(())
            }
            FaultKind::ForwardDelay { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse() {
        assert_eq!(
            "forward-error:3".parse(),
            Ok(Fault {
                kind: FaultKind::ForwardError,
                at_forward: 3
            })
        );
        assert!("forward-panic:1".parse::<Fault>().is_ok());
        assert_eq!(
            "forward-stall:2:1500".parse(),
            Ok(Fault {
                kind: FaultKind::ForwardStall { ms: 1500 },
                at_forward: 2
            })
        );
        for bad in [
            "forward-error",
            "forward-error:0",
            "oom:2",
            "forward-panic:x",
            "forward-error:1:5",
            "forward-stall:1",
            "forward-delay:1",
        ] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_fault_fires_once_at_its_pass() {
        let mut counter = FaultCounter::new(Some(Fault {
            kind: FaultKind::ForwardError,
            at_forward: 2,
        }));
        assert!(counter.before_forward().is_ok());
        assert!(counter.before_forward().is_err());
        assert!(counter.before_forward().is_ok());
    }

    #[test]
    fn a_delay_slows_every_pass_from_its_own() {
        let fault: Fault = "forward-delay:2:30".parse().unwrap();
        assert_eq!(fault.kind, FaultKind::ForwardDelay { ms: 30 });
        let mut counter = FaultCounter::new(Some(fault));
        let timed = |counter: &mut FaultCounter| {
            let start = std::time::Instant::now();
            assert!(counter.before_forward().is_ok());
            start.elapsed()
        };
        assert!(timed(&mut counter) < std::time::Duration::from_millis(30));
        for _ in 0..3 {
            assert!(timed(&mut counter) >= std::time::Duration::from_millis(30));
        }
    }
}
