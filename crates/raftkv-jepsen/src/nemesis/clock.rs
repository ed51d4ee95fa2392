//! Restart one node under libfaketime with a shifted clock running slow or fast, then with the true
//! clock.

use rand::Rng;
use rand::rngs::StdRng;

use super::Strike;

/// Where Debian's libfaketime keeps the multi-threaded preload library.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

pub(super) async fn inject(s: &Strike<'_>, rng: &mut StdRng) -> anyhow::Result<()> {
    let target = s.target();
    // Alternately slow and fast, and shifted back or forward by up to five minutes.
    let rate: f64 = if rng.random_bool(0.5) {
        rng.random_range(0.5..0.8)
    } else {
        rng.random_range(1.25..2.0)
    };
    let offset: i64 = rng.random_range(-300..=300);
    let faketime = format!("{offset:+}s x{rate:.2}");
    let detail = format!("restart {} with FAKETIME={faketime:?}", s.target_note());
    let ix = s.history().fault_started(s.fault.name(), detail.clone());
    tracing::info!(fault = %s.fault, %detail, hold = ?s.hold, "nemesis: clock");
    {
        let mut nodes = s.nodes.lock().await;
        nodes.kill(target)?;
        nodes.start_with_env(
            target,
            &[("LD_PRELOAD", LIBFAKETIME), ("FAKETIME", &faketime)],
        )?;
    }
    tokio::time::sleep(s.hold).await;
    s.nodes.lock().await.restart(target)?;
    s.history().fault_ended(ix);
    Ok(())
}
