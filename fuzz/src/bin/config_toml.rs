//! `ember train --config`: a TOML config is refused with an error or accepted within every
//! limit; an accepted config survives a TOML round trip and can be planned.
#![no_main]
use ember_engine::config::TrainConfig;
use ember_engine::plan::planner::{plan, PlanOptions};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(cfg) = TrainConfig::from_toml(text) else { return };
    let again = TrainConfig::from_toml(&cfg.to_toml()).expect("a valid config round-trips");
    assert_eq!(again, cfg);
    let report = plan(&cfg.model, 2, 3, &PlanOptions::from_config(&cfg)).expect("a valid config plans").1;
    assert_eq!(report.ranks.len(), 3);
});
