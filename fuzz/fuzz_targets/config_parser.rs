//! Experiment configs (`pnn-train --config`, and the settings a checkpoint stores): any text is
//! parsed or refused with a located error, never a panic; what parses converts to a run or says
//! why not, and writes back to text that parses to the same settings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pnn::run::settings::ExperimentConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = ExperimentConfig::parse(text, "fuzz.ron") {
        let _ = config.to_run_config();
        let _ = config.check_resume_changes(&config);
        let again = ExperimentConfig::parse(&config.to_ron(), "again.ron")
            .expect("written settings read back");
        assert_eq!(again.to_ron(), config.to_ron());
    }
});
