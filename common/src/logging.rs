//! Logging through `log`, to stderr (journald picks it up under systemd).

use log::LevelFilter;

/// `--log-level` wins when given; otherwise `RUST_LOG`; otherwise `info`.
pub fn init(level: Option<LevelFilter>) {
    let mut builder = env_logger::Builder::new();
    match level {
        Some(level) => {
            builder.filter_level(level);
        }
        None => match std::env::var("RUST_LOG") {
            Ok(spec) => {
                builder.parse_filters(&spec);
            }
            Err(_) => {
                builder.filter_level(LevelFilter::Info);
            }
        },
    }
    // A second initialisation (tests embedding several daemons) is harmless.
    let _ = builder.format_timestamp_millis().try_init();
}
