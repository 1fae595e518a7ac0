//! Device profiles: RON files in `devices/` that say what a (simulated or real) device is.

use std::path::Path;

/// A device profile as stored in `devices/*.ron`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    /// Short name, reported by the device in its handshake.
    pub name: String,
    /// Where the profile's numbers come from.
    #[serde(default)]
    pub description: String,
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

    /// Parses profile text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ProfileError> {
        ron::from_str(text).map_err(|e| ProfileError::Parse {
            path: origin.to_string(),
            line: e.span.start.line,
            column: e.span.start.col,
            message: e.code.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_ideal_profile_parses() {
        let p = DeviceProfile::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../devices/ideal.ron"),
        )
        .unwrap();
        assert_eq!(p.name, "ideal");
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_line() {
        let err = DeviceProfile::parse("(\n  name: \"x\",\n  bogus: 3,\n)", "t.ron").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 3") && msg.contains("bogus"), "{msg}");
    }
}
