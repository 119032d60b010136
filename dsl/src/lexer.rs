//! Tokens of the step language.
//!
//! The lexer works on the decoded text of the `step` string; every span it produces is a byte
//! range into that text (the caller maps it into the rule file). Newlines end statements only
//! while no parenthesis is open, so the lexer drops them inside parentheses; it also checks that
//! parentheses balance, so that the parser can report a missing `)` where the `(` is.

use crate::ast::Span;

/// One token of the step language.
#[derive(Clone, Debug, PartialEq)]
pub enum Tok {
    Ident(String),
    Num(f64),
    Plus,
    Minus,
    Star,
    Slash,
    At,
    /// `^T`.
    Transpose,
    LParen,
    RParen,
    Comma,
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
    /// `==`.
    EqEq,
    /// `!=`.
    Ne,
    /// End of a statement: a line break outside parentheses.
    Newline,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub tok: Tok,
    /// Byte range in the step text.
    pub span: Span,
}

/// A lexing error, with its span in the step text.
#[derive(Clone, Debug, PartialEq)]
pub struct LexError {
    pub span: Span,
    pub message: String,
    pub label: String,
    pub help: String,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_continue(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// True for `1`, `0.5`, `.5`, `1.`, `1e-3`, `2.5E+2`.
fn is_number(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0;
    let int_digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    i += int_digits;
    let mut frac_digits = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        frac_digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        i += frac_digits;
    }
    if int_digits == 0 && frac_digits == 0 {
        return false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exp_digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        if exp_digits == 0 {
            return false;
        }
        i += exp_digits;
    }
    i == b.len()
}

const NUMBER_HELP: &str =
    "numbers are written like 1, 0.5, .5, 1e-3 or 2.5E+2; put an operator between a number and a name";

/// Splits the step text into tokens. Comments (`#` to the end of the line) and blank space are
/// dropped; a line break becomes [`Tok::Newline`] unless a parenthesis is open.
pub fn lex(text: &str) -> Result<Vec<Token>, LexError> {
    let mut tokens = Vec::new();
    let mut open: Vec<Span> = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < text.len() {
        let Some(c) = text[i..].chars().next() else { break };
        let start = i;
        let single = |tok: Tok| Token { tok, span: Span::new(start, start + 1) };
        match c {
            ' ' | '\t' | '\r' => i += 1,
            '#' => {
                i = text[i..].find('\n').map_or(text.len(), |n| i + n);
            }
            '\n' => {
                if open.is_empty() {
                    tokens.push(single(Tok::Newline));
                }
                i += 1;
            }
            c if is_ident_start(c) => {
                let len = text[i..].find(|c: char| !is_ident_continue(c)).unwrap_or(text.len() - i);
                i += len;
                tokens.push(Token { tok: Tok::Ident(text[start..i].to_string()), span: Span::new(start, i) });
            }
            c if c.is_ascii_digit() || (c == '.' && bytes.get(i + 1).is_some_and(|b| b.is_ascii_digit())) => {
                // Take everything that could belong to a number (or a mistyped one), then judge it.
                i += 1;
                while let Some(&b) = bytes.get(i) {
                    let exponent_sign = (b == b'+' || b == b'-') && matches!(bytes.get(i - 1), Some(b'e' | b'E')) && {
                        // `2e-3` is a number; in `x*2e - 3` the `-` is not part of it.
                        bytes.get(i + 1).is_some_and(|d| d.is_ascii_digit())
                    };
                    if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || exponent_sign {
                        i += 1;
                    } else {
                        break;
                    }
                }
                let lit = &text[start..i];
                let span = Span::new(start, i);
                let bad = |why: &str| LexError {
                    span,
                    message: format!("bad number `{lit}`"),
                    label: why.to_string(),
                    help: NUMBER_HELP.to_string(),
                };
                if !is_number(lit) {
                    return Err(bad("not a number"));
                }
                match lit.parse::<f64>() {
                    Ok(v) if v.is_finite() => tokens.push(Token { tok: Tok::Num(v), span }),
                    _ => return Err(bad("too large for a 64-bit float")),
                }
            }
            '^' => {
                let next = text[i + 1..].chars().next();
                let after = text.get(i + 2..).and_then(|s| s.chars().next());
                if next == Some('T') && !after.is_some_and(is_ident_continue) {
                    tokens.push(Token { tok: Tok::Transpose, span: Span::new(start, start + 2) });
                    i += 2;
                } else {
                    return Err(LexError {
                        span: Span::new(start, start + 1),
                        message: "`^` must be followed by `T`".to_string(),
                        label: "expected `^T`".to_string(),
                        help: "`^T` transposes the state, as in S^T @ q; for a power write pow(a, b)".to_string(),
                    });
                }
            }
            '(' => {
                open.push(Span::new(start, start + 1));
                tokens.push(single(Tok::LParen));
                i += 1;
            }
            ')' => {
                if open.pop().is_none() {
                    return Err(LexError {
                        span: Span::new(start, start + 1),
                        message: "unmatched `)`".to_string(),
                        label: "no `(` before this".to_string(),
                        help: "remove this `)` or add the `(` that it closes".to_string(),
                    });
                }
                tokens.push(single(Tok::RParen));
                i += 1;
            }
            '<' | '>' | '=' | '!' if bytes.get(i + 1) == Some(&b'=') => {
                let tok = match c {
                    '<' => Tok::Le,
                    '>' => Tok::Ge,
                    '=' => Tok::EqEq,
                    _ => Tok::Ne,
                };
                tokens.push(Token { tok, span: Span::new(start, start + 2) });
                i += 2;
            }
            '!' => {
                return Err(LexError {
                    span: Span::new(start, start + 1),
                    message: "`!` is only part of `!=`".to_string(),
                    label: "no logical not in the step language".to_string(),
                    help: "to negate a condition c write c == 0, or compare the other way (a >= b for !(a < b))"
                        .to_string(),
                });
            }
            '<' | '>' => {
                tokens.push(single(if c == '<' { Tok::Lt } else { Tok::Gt }));
                i += 1;
            }
            '+' | '-' | '*' | '/' | '@' | ',' | '=' => {
                let tok = match c {
                    '+' => Tok::Plus,
                    '-' => Tok::Minus,
                    '*' => Tok::Star,
                    '/' => Tok::Slash,
                    '@' => Tok::At,
                    ',' => Tok::Comma,
                    _ => Tok::Eq,
                };
                tokens.push(single(tok));
                i += 1;
            }
            _ => {
                return Err(LexError {
                    span: Span::new(start, start + c.len_utf8()),
                    message: format!("unexpected character `{}`", c.escape_debug()),
                    label: "not part of the step language".to_string(),
                    help: "a step is made of names, numbers, `+ - * / @ ^T`, comparisons (`< <= > >= == !=`), \
                           parentheses, commas, `=` and # comments"
                        .to_string(),
                });
            }
        }
    }
    if let Some(&span) = open.first() {
        return Err(LexError {
            span,
            message: "unclosed `(`".to_string(),
            label: "this parenthesis is never closed".to_string(),
            help: "add the missing `)`; a statement runs on over the next lines while a parenthesis is open"
                .to_string(),
        });
    }
    Ok(tokens)
}

/// How a token reads in a message.
pub fn describe(tok: &Tok, text: &str) -> String {
    match tok {
        Tok::Ident(name) => format!("`{name}`"),
        Tok::Num(_) => format!("the number `{text}`"),
        Tok::Newline => "the end of the line".to_string(),
        _ => format!("`{text}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(text: &str) -> Vec<Tok> {
        lex(text).map(|t| t.into_iter().map(|t| t.tok).collect()).unwrap_or_default()
    }

    #[test]
    fn numbers() {
        for (s, v) in [("1", 1.0), ("0.5", 0.5), (".5", 0.5), ("1e-3", 1e-3), ("2.5E+2", 250.0), ("3.", 3.0)] {
            assert_eq!(toks(s), vec![Tok::Num(v)], "{s}");
        }
        for s in ["1e", "1.2.3", "2x", "1e+", "0x10", "1e999"] {
            assert!(lex(s).is_err(), "{s}");
        }
        assert!(lex("2e-x").is_err());
        assert_eq!(toks("2-x"), vec![Tok::Num(2.0), Tok::Minus, Tok::Ident("x".into())]);
    }

    #[test]
    fn newlines_inside_parentheses_are_dropped() {
        assert_eq!(
            toks("a = (b\n+ c) # note\nd = 1"),
            vec![
                Tok::Ident("a".into()),
                Tok::Eq,
                Tok::LParen,
                Tok::Ident("b".into()),
                Tok::Plus,
                Tok::Ident("c".into()),
                Tok::RParen,
                Tok::Newline,
                Tok::Ident("d".into()),
                Tok::Eq,
                Tok::Num(1.0),
            ]
        );
    }

    #[test]
    fn transpose_and_errors() {
        assert_eq!(toks("S^T"), vec![Tok::Ident("S".into()), Tok::Transpose]);
        assert!(lex("S^2").is_err());
        assert!(lex("S^Tx").is_err());
        assert!(lex("(a").is_err());
        assert!(lex("a)").is_err());
        assert!(lex("a $ b").is_err());
        assert!(lex("é").is_err());
    }
}
