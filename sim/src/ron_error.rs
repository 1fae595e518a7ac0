//! Where a RON text went wrong, for messages that name the file, the line and the key: device
//! profiles (`crate::profile`) and the host's experiment configs both read RON and report their
//! errors through [`locate`].

/// A RON error placed in its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// 1-based line and column where the error starts.
    pub line: usize,
    pub column: usize,
    /// The dotted path of the key being read there (`noise.adc.bits`), where there is one.
    pub key: Option<String>,
    /// What RON said.
    pub message: String,
}

/// Places `error`, raised while reading `text`, at its line, column and key. A key that RON
/// names itself (an unknown, duplicate or missing field) is that key; otherwise it is the last
/// key written before the error (a value may span lines: its key is on an earlier line, and a
/// key later on the error's line is not it), unless the error sits in the line's indentation,
/// before the line's first key: then it is that key.
pub fn locate(text: &str, error: &ron::error::SpannedError) -> Located {
    let (line, column) = (error.span.start.line, error.span.start.col);
    let keys = keys(text);
    let at = |name: &str| {
        keys.iter()
            .rev()
            .find(|(k, l, c)| (*l, *c) <= (line, column) && k.rsplit('.').next() == Some(name))
            .map(|(k, _, _)| k.clone())
            .unwrap_or_else(|| name.to_string())
    };
    let key = match &error.code {
        ron::Error::NoSuchStructField { found, .. } => Some(at(found)),
        ron::Error::DuplicateStructField { field, .. } => Some(at(field)),
        ron::Error::MissingStructField { field, .. } => Some(field.to_string()),
        _ => {
            let before = keys
                .iter()
                .take_while(|(_, l, c)| (*l, *c) <= (line, column))
                .last();
            let on_line = keys.iter().find(|(_, l, _)| *l == line);
            let indentation = text
                .lines()
                .nth(line.saturating_sub(1))
                .map_or(0, |l| l.chars().take_while(|c| c.is_whitespace()).count());
            match (before, on_line) {
                (_, Some(first)) if column <= indentation + 1 && first.2 > column => Some(first),
                (Some(k), _) => Some(k),
                (None, first) => first,
            }
            .map(|(k, _, _)| k.clone())
        }
    };
    Located {
        line,
        column,
        key,
        message: error.code.to_string(),
    }
}

/// Where the key with this dotted path is written: (line, column), both 1-based.
pub fn line_of_key(text: &str, key: &str) -> Option<(usize, usize)> {
    keys(text)
        .into_iter()
        .find(|(k, _, _)| k == key)
        .map(|(_, l, c)| (l, c))
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
