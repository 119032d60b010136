//! Checking: typing a parsed rule into an `ast::Rule` (front-end work in progress).

use crate::ast::Rule;
use crate::diag::Diagnostic;
use std::path::Path;

/// Reads, parses and checks a rule file.
pub fn load_rule(path: &Path) -> Result<Rule, Diagnostic> {
    let shown = path.display().to_string();
    let source = std::fs::read_to_string(path)
        .map_err(|e| Diagnostic::error(&shown, "", Default::default(), format!("cannot read rule file: {e}")))?;
    parse_rule(&shown, &source)
}

/// Parses and checks rule-file text; `path` is only used in diagnostics.
pub fn parse_rule(path: &str, source: &str) -> Result<Rule, Diagnostic> {
    Err(Diagnostic::error(path, source, Default::default(), "the rule parser is not written yet"))
}
