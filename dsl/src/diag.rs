//! Diagnostics: one error, pointing into a rule file with file:line:col, the line and a caret.

use crate::ast::Span;
use std::fmt;

/// An error (or warning) about a rule file, rendered as one screen:
///
/// ```text
/// rules/bad.toml:7:13: error: unknown name `kk`
///    |
///  7 | S = S + outer(kk, v)
///    |               ^^ not an input, a local or a built-in
///    = help: the inputs are q, k, v
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    pub span: Span,
    /// Short text after the caret.
    pub label: String,
    /// A sentence that says what to do.
    pub help: Option<String>,
    pub path: String,
    pub source: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

impl Diagnostic {
    pub fn error(path: &str, source: &str, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            message: message.into(),
            span,
            label: String::new(),
            help: None,
            path: path.to_string(),
            source: source.to_string(),
        }
    }

    pub fn warning(path: &str, source: &str, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic { severity: Severity::Warning, ..Diagnostic::error(path, source, span, message) }
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Diagnostic {
        self.label = label.into();
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    /// 1-based line and column (in characters) of the span's start.
    pub fn line_col(&self) -> (usize, usize) {
        line_col(&self.source, self.span.start)
    }

    /// `path:line:col`.
    pub fn location(&self) -> String {
        let (line, col) = self.line_col();
        format!("{}:{}:{}", self.path, line, col)
    }
}

/// 1-based line and column (in characters) of a byte offset, clamped into the text.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = source[line_start..offset].chars().count() + 1;
    (line, col)
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let (line, col) = self.line_col();
        writeln!(f, "{}:{}:{}: {}: {}", self.path, line, col, kind, self.message)?;
        let text = self.source.lines().nth(line - 1).unwrap_or("");
        let gutter = line.to_string().len();
        writeln!(f, "{:gutter$} |", "")?;
        writeln!(f, "{line} | {text}")?;
        // Caret under the span, clipped to this line, at least one character wide.
        let line_chars = text.chars().count();
        let start_col = (col - 1).min(line_chars);
        let span_chars = self
            .source
            .get(self.span.start.min(self.source.len())..self.span.end.min(self.source.len()))
            .map(|s| s.lines().next().unwrap_or("").chars().count())
            .unwrap_or(0);
        let width = span_chars.clamp(1, (line_chars + 1).saturating_sub(start_col).max(1));
        write!(f, "{:gutter$} | {}{}", "", " ".repeat(start_col), "^".repeat(width))?;
        if !self.label.is_empty() {
            write!(f, " {}", self.label)?;
        }
        writeln!(f)?;
        if let Some(help) = &self.help {
            writeln!(f, "{:gutter$} = help: {}", "", help)?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostic {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_location_line_and_caret() {
        let src = "name = \"x\"\nstep = \"S = kk\"\n";
        let start = src.find("kk").unwrap();
        let d = Diagnostic::error("r.toml", src, Span::new(start, start + 2), "unknown name `kk`")
            .with_label("not defined")
            .with_help("declare it under [inputs]");
        let text = d.to_string();
        assert!(text.starts_with("r.toml:2:13: error: unknown name `kk`\n"), "{text}");
        assert!(text.contains("2 | step = \"S = kk\"\n"), "{text}");
        assert!(text.contains("  |             ^^ not defined\n"), "{text}");
        assert!(text.contains("= help: declare it under [inputs]"), "{text}");
    }

    #[test]
    fn span_past_end_is_clamped() {
        let d = Diagnostic::error("r.toml", "ab", Span::new(10, 12), "eof");
        assert_eq!(d.line_col(), (1, 3));
        assert!(d.to_string().contains('^'));
    }
}
