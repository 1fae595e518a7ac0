//! Device profiles: RON files in `devices/` that say what a (simulated or real) device is.
//!
//! Profiles are read with RON's `implicit_some` extension: an optional value is written bare
//! (`adc: (bits: 9, bound: 12.0)`) or as `Some(...)`.

use std::path::Path;

use crate::noise::NoiseModel;

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
            let (line, column) = (e.span.start.line, e.span.start.col);
            let message = match key_at(text, line, column) {
                Some(key) => format!("{}: {}", key, e.code),
                None => e.code.to_string(),
            };
            ProfileError::Parse {
                path: origin.to_string(),
                line,
                column,
                message,
            }
        })?;
        profile.noise.validate("noise").map_err(|e| {
            let (line, column) = line_of_key(text, &e.key).unwrap_or((0, 0));
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

/// Every key of a RON text with its dotted path and (line, column), both 1-based. Strings and
/// comments are skipped; nesting is followed through parentheses and brackets.
fn keys(text: &str) -> Vec<(String, usize, usize)> {
    let chars: Vec<char> = text.chars().collect();
    let mut found = Vec::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let (mut depth, mut i, mut line, mut col) = (0usize, 0usize, 1usize, 1usize);
    let advance = |i: &mut usize, line: &mut usize, col: &mut usize| {
        if chars[*i] == '\n' {
            *line += 1;
            *col = 1;
        } else {
            *col += 1;
        }
        *i += 1;
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                advance(&mut i, &mut line, &mut col);
            }
        } else if c == '/' && next == Some('*') {
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                advance(&mut i, &mut line, &mut col);
            }
            for _ in 0..2 {
                if i < chars.len() {
                    advance(&mut i, &mut line, &mut col);
                }
            }
        } else if c == '"' {
            advance(&mut i, &mut line, &mut col);
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    advance(&mut i, &mut line, &mut col);
                }
                advance(&mut i, &mut line, &mut col);
            }
            if i < chars.len() {
                advance(&mut i, &mut line, &mut col);
            }
        } else if c == '(' || c == '[' {
            depth += 1;
            advance(&mut i, &mut line, &mut col);
        } else if c == ')' || c == ']' {
            depth = depth.saturating_sub(1);
            stack.retain(|(d, _)| *d <= depth);
            advance(&mut i, &mut line, &mut col);
        } else if c.is_alphabetic() || c == '_' {
            let (start_line, start_col) = (line, col);
            let mut ident = String::new();
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                ident.push(chars[i]);
                advance(&mut i, &mut line, &mut col);
            }
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            if chars.get(j) == Some(&':') {
                stack.retain(|(d, _)| *d < depth);
                stack.push((depth, ident));
                let path: Vec<&str> = stack.iter().map(|(_, k)| k.as_str()).collect();
                found.push((path.join("."), start_line, start_col));
            }
        } else {
            advance(&mut i, &mut line, &mut col);
        }
    }
    found
}

/// The path of the last key at or before (line, column).
fn key_at(text: &str, line: usize, column: usize) -> Option<String> {
    keys(text)
        .into_iter()
        .take_while(|(_, l, c)| (*l, *c) <= (line, column))
        .last()
        .map(|(k, _, _)| k)
}

/// Where the key with this dotted path is written.
fn line_of_key(text: &str, key: &str) -> Option<(usize, usize)> {
    keys(text)
        .into_iter()
        .find(|(k, _, _)| k == key)
        .map(|(_, l, c)| (l, c))
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
    fn every_shipped_profile_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../devices");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "ron") {
                DeviceProfile::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 1);
    }

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
