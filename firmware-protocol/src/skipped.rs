//! Skipped checks are counted, never silent: a test that cannot make its comparison on this
//! machine (no AVX2 to compare against the portable path, no Python packages for the export
//! check) calls [`skipped`] instead of passing quietly.
//!
//! `.ci/run` names a file in `PNN_SKIP_LOG`; each skip appends one line to it, and the script
//! prints the count at the end (and fails with `CI=true`). Cargo captures a passing test's
//! output, so a line on stderr alone would not be seen. With `CI=true` and no log to count in,
//! a skip fails the test: in CI a missing prerequisite is an error, not a pass.

use std::io::Write;

/// Reports that `check` did not run, and `why`: appended to `$PNN_SKIP_LOG` when set; a panic
/// when `CI=true` and no log is set; otherwise a line on stderr.
pub fn skipped(check: &str, why: &str) {
    let line = format!("SKIPPED {check}: {why}");
    std::eprintln!("{line}");
    match std::env::var_os("PNN_SKIP_LOG") {
        Some(path) => {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("PNN_SKIP_LOG {path:?}: {e}"));
            // One short write per line: appends of concurrent test processes do not interleave.
            file.write_all(format!("{line}\n").as_bytes())
                .unwrap_or_else(|e| panic!("PNN_SKIP_LOG {path:?}: {e}"));
        }
        None if std::env::var("CI").is_ok_and(|v| v == "true") => panic!(
            "{line}\nCI=true: a missing prerequisite fails the test (run it through .ci/run, \
             which counts skips in PNN_SKIP_LOG, or provide the prerequisite)"
        ),
        None => {}
    }
}
