//! Continuous emission while a scenario injects its faults: a few emitter tasks, each sending one
//! packet at a time at a paced rate and retrying it until the distributor acknowledges it (through
//! kills, restarts, 503s and 507s), every acknowledgement recorded in a [`Ledger`].

use crate::client::DistributorClient;
use crate::generate::{emitter_id, Generator};
use crate::ledger::Ledger;
use crate::sender::send_one;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

/// How long one packet is retried before the load gives up on it (it then counts as not
/// acknowledged, which is never a loss).
const PACKET_DEADLINE: Duration = Duration::from_secs(90);

/// The emission's shape.
#[derive(Debug, Clone, Copy)]
pub struct LoadShape {
    /// Messages per second over all emitters (paced; lower while the distributor is down).
    pub rate: u64,
    pub emitters: u32,
    pub packet_size: u32,
}

/// Emitters running in the background.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    pub ledger: Arc<Ledger>,
}

impl Load {
    /// Start `shape.emitters` emitters against `distributor_url`.
    pub fn start(distributor_url: &str, shape: LoadShape, seed: u64) -> anyhow::Result<Self> {
        let ledger = Arc::new(Ledger::new(usize::MAX >> 1));
        let client = DistributorClient::new(distributor_url, Duration::from_secs(2))?
            .with_max_backoff(Duration::from_millis(500))
            .with_retry_counter(ledger.retry_counter());
        let stop = Arc::new(AtomicBool::new(false));
        let per_emitter = (shape.rate as f64 / f64::from(shape.emitters.max(1))).max(1.0);
        let period = Duration::from_secs_f64(f64::from(shape.packet_size) / per_emitter);
        let run_id = crate::generate::new_run_id();
        let tasks = (1..=shape.emitters.max(1))
            .map(|n| {
                let (client, ledger, stop) =
                    (client.clone(), Arc::clone(&ledger), Arc::clone(&stop));
                let mut generator = Generator::new(format!("{run_id}-{n}"), seed ^ u64::from(n));
                let id = emitter_id(n);
                let packet_size = shape.packet_size;
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(period);
                    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let packet = generator.next_packet(&id, packet_size);
                        let deadline = Some(Instant::now() + PACKET_DEADLINE);
                        // The outcome is recorded in the ledger; a failure is not a loss.
                        let _ = send_one(&client, &ledger, &packet, deadline).await;
                    }
                })
            })
            .collect();
        Ok(Self {
            stop,
            tasks,
            ledger,
        })
    }

    /// Stop making new packets and wait for those in flight to be acknowledged (or to pass their
    /// deadline).
    pub async fn stop(self) -> Arc<Ledger> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            // A panicked emitter task shows in the counts (its packet is never acknowledged).
            let _ = task.await;
        }
        self.ledger
    }
}
