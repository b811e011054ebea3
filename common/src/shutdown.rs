//! A small shared shutdown signal (in the manner of mini-redis): long-running
//! loops (serve, speed consume, ingest) finish the unit of work in hand and stop
//! when it fires. SIGTERM and Ctrl-C fire it.

use tokio::sync::watch;

/// The sending half: fire it to ask every holder of a [`Shutdown`] to stop.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// The receiving half, cheap to clone into every task.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new trigger and its signal.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Ask everyone to stop.
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }

    /// Fire on SIGTERM or Ctrl-C (spawns a task; needs a tokio runtime).
    pub fn fire_on_signals(self) {
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested: finishing the work in hand");
            self.fire();
        });
    }
}

impl Shutdown {
    /// Whether shutdown was asked for.
    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }

    /// Wait until shutdown is asked for.
    pub async fn wait(&mut self) {
        while !*self.0.borrow() {
            if self.0.changed().await.is_err() {
                // the trigger is gone: nobody can ask any more, so never resolve
                std::future::pending::<()>().await;
            }
        }
    }

    /// A signal that never fires (for one-shot runs and tests).
    pub fn never() -> Self {
        let (tx, rx) = watch::channel(false);
        std::mem::forget(tx);
        Shutdown(rx)
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
