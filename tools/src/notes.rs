//! What a command tells its user on stderr while it runs: one-line notes (`note`), the engine's
//! checkpoint announcements (its `tracing` events of target `checkpoint::LOG_TARGET`: a resume,
//! no checkpoint to resume from, every save), printed above `ember train`'s progress bar, and
//! the log (`EMBER_LOG`, default `warn`) for every other event.
use indicatif::ProgressBar;
use std::sync::Mutex;
use tracing::field::{Field, Visit};
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// The progress bar on screen, if any: notes are printed above it.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Install the log and the checkpoint notes.
pub fn init() {
    let target = ember_engine::checkpoint::LOG_TARGET;
    let env = EnvFilter::try_from_env("EMBER_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let env = match format!("{target}=off").parse() {
        Ok(d) => env.add_directive(d),
        Err(_) => env,
    };
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(env);
    let notes = Notes.with_filter(Targets::new().with_target(target, tracing::Level::INFO));
    tracing_subscriber::registry().with(log).with(notes).init();
}

/// Print `line` on stderr (above the progress bar while one is shown).
pub fn note(line: &str) {
    let bar = BAR.lock().map(|b| b.clone()).unwrap_or(None);
    match bar {
        Some(bar) => bar.suspend(|| eprintln!("{line}")),
        None => eprintln!("{line}"),
    }
}

/// Show notes above `bar` from now on (None: the bar is gone).
pub fn set_bar(bar: Option<ProgressBar>) {
    if let Ok(mut b) = BAR.lock() {
        *b = bar;
    }
}

/// The checkpoint announcements, as `checkpoint: <message>`.
struct Notes;

impl<S: tracing::Subscriber> Layer<S> for Notes {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut m = Message(String::new());
        event.record(&mut m);
        note(&format!("checkpoint: {}", m.0));
    }
}

struct Message(String);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_string();
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}
