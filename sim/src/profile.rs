//! Device profiles: RON files in `devices/` that say what a (simulated or real) device is.
//!
//! Profiles are read with RON's `implicit_some` extension: an optional value is written bare
//! (`adc: (bits: 9, bound: 12.0)`) or as `Some(...)`.

use std::path::Path;

use crate::noise::NoiseModel;
use crate::ron_error;

/// A device profile as stored in `devices/*.ron`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    /// Short name, reported by the device in its handshake.
    pub name: String,
    /// Where the profile's numbers come from.
    #[serde(default)]
    pub description: String,
    /// The device's hardware effects (absent: none). See [`crate::noise`].
    #[serde(default)]
    pub noise: NoiseModel,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read device profile {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("device profile {path}, line {line}, column {column}: {message}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

impl DeviceProfile {
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates profile text; `origin` names it in errors, which also give the line
    /// and the key.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ProfileError> {
        let options = ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
        let profile: Self = options.from_str(text).map_err(|e| {
            let at = ron_error::locate(text, &e);
            ProfileError::Parse {
                path: origin.to_string(),
                line: at.line,
                column: at.column,
                message: match at.key {
                    Some(key) => format!("{key}: {}", at.message),
                    None => at.message,
                },
            }
        })?;
        profile.noise.validate("noise").map_err(|e| {
            let (line, column) = ron_error::line_of_key(text, &e.key).unwrap_or((0, 0));
            ProfileError::Parse {
                path: origin.to_string(),
                line,
                column,
                message: e.to_string(),
            }
        })?;
        Ok(profile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The shipped profiles are checked by tests/noise_effects.rs
    // (every_shipped_profile_parses_and_says_where_its_numbers_come_from).

    #[test]
    fn bad_values_name_the_file_line_and_key() {
        let text = "(\n  name: \"x\",\n  noise: (\n    adc: (bits: 9, bound: 12.0),\n    output_noise: -0.5,\n  ),\n)";
        let msg = DeviceProfile::parse(text, "bad.ron")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("bad.ron") && msg.contains("line 5") && msg.contains("noise.output_noise"),
            "{msg}"
        );
        let text =
            "(\n  name: \"x\",\n  noise: (\n    adc: (bits: \"nine\", bound: 12.0),\n  ),\n)";
        let msg = DeviceProfile::parse(text, "bad.ron")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("line 4") && msg.contains("noise.adc.bits"),
            "{msg}"
        );
        let text = "(\n  name: \"x\", // a comment with key: and \"quotes\n  noise: (\n    dac: (bits: 30, bound: 1.0),\n  ),\n)";
        let msg = DeviceProfile::parse(text, "bad.ron")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("line 4") && msg.contains("noise.dac.bits"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_line() {
        let err = DeviceProfile::parse("(\n  name: \"x\",\n  bogus: 3,\n)", "t.ron").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 3") && msg.contains("bogus"), "{msg}");
    }
}
