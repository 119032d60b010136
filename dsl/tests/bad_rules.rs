//! Bad rule files: each must fail with exactly this diagnostic (the first error in the file).

use chunkc_dsl::parse_rule;

/// Parses `source` as `bad/<name>.toml` and compares the full rendered diagnostic.
fn check(name: &str, source: &str, expected: &str) {
    let path = format!("bad/{name}.toml");
    let diag = match parse_rule(&path, source) {
        Ok(rule) => panic!("{path} should be rejected, got {} statements", rule.stmts.len()),
        Err(d) => d,
    };
    assert!(diag.span.start <= diag.span.end && diag.span.end <= source.len(), "{:?}", diag.span);
    assert!(diag.help.is_some(), "every error says what to do:\n{diag}");
    assert_eq!(diag.to_string(), expected, "\n--- got ---\n{diag}\n--- expected ---\n{expected}");
}

#[test]
fn toml_syntax_error() {
    check(
        "toml_syntax_error",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = [K]
k = "[K]"
v = "[V]"
"#,
        r#"bad/toml_syntax_error.toml:7:6: error: invalid TOML: string values must be quoted, expected literal string
  |
7 | q = [K]
  |      ^ TOML syntax error
  = help: fix the TOML syntax here; strings need quotes, and a multi-line step goes between ''' and '''
"#,
    );
}

#[test]
fn missing_name() {
    check(
        "missing_name",
        r#"step = '''
S = S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/missing_name.toml:1:1: error: missing `name`
  |
1 | step = '''
  | ^ `name` is required
  = help: add `name = "my_rule"` at the top of the file
"#,
    );
}

#[test]
fn missing_step() {
    check(
        "missing_step",
        r#"name = "r"

[inputs]
q = "[K]"
"#,
        r#"bad/missing_step.toml:1:1: error: missing `step`
  |
1 | name = "r"
  | ^ `step` is required
  = help: add `step = '''...'''` above [inputs], with one `NAME = expr` statement per line
"#,
    );
}

#[test]
fn step_after_inputs() {
    check(
        "step_after_inputs",
        r#"name = "r"

[inputs]
q = "[K]"
k = "[K]"
v = "[V]"

step = '''
S = S + outer(k, v)
o = S^T @ q
'''
"#,
        r#"bad/step_after_inputs.toml:8:1: error: `step` is inside the [inputs] table
  |
8 | step = '''
  | ^^^^ read as an input
  = help: move `step = ...` above the [inputs] line: TOML puts every key that follows a [table] header into that table
"#,
    );
}

#[test]
fn missing_inputs() {
    check(
        "missing_inputs",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S^T @ q
'''
"#,
        r#"bad/missing_inputs.toml:1:1: error: missing `inputs`
  |
1 | name = "r"
  | ^ `inputs` is required
  = help: add an [inputs] table that declares each input's shape, e.g. q = "[K]"
"#,
    );
}

#[test]
fn empty_inputs() {
    check(
        "empty_inputs",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S^T @ q
'''
[inputs]
"#,
        r#"bad/empty_inputs.toml:6:1: error: [inputs] declares no inputs
  |
6 | [inputs]
  | ^^^^^^^^ empty table
  = help: declare each input that the step reads, e.g. q = "[K]"
"#,
    );
}

#[test]
fn unknown_top_level_key() {
    check(
        "unknown_top_level_key",
        r#"name = "r"
chunkable = true
step = '''
S = S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/unknown_top_level_key.toml:2:1: error: unknown top-level key `chunkable`
  |
2 | chunkable = true
  | ^^^^^^^^^ not a rule-file key
  = help: the top-level keys are name, summary, chunked, step, inputs and states
"#,
    );
}

#[test]
fn wrong_value_type() {
    check(
        "wrong_value_type",
        r#"name = "r"
chunked = "yes"
step = '''
S = S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/wrong_value_type.toml:2:11: error: `chunked` must be a boolean, found a string
  |
2 | chunked = "yes"
  |           ^^^^^ expected a boolean
  = help: write chunked = true or chunked = false (no quotes)
"#,
    );
}

#[test]
fn name_not_identifier() {
    check(
        "name_not_identifier",
        r#"name = "gated delta"
step = '''
S = S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/name_not_identifier.toml:1:8: error: invalid rule name `gated delta`
  |
1 | name = "gated delta"
  |        ^^^^^^^^^^^^^ not an identifier
  = help: a rule name is a letter or `_` followed by letters, digits or `_`, e.g. gated_delta
"#,
    );
}

#[test]
fn unknown_input_key() {
    check(
        "unknown_input_key",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = { shape = "[K]", domian = "unit_norm" }
v = "[V]"
"#,
        r#"bad/unknown_input_key.toml:8:22: error: unknown key `domian` in input `k`
  |
8 | k = { shape = "[K]", domian = "unit_norm" }
  |                      ^^^^^^ not an input key
  = help: an input table takes shape, domain and per_head
"#,
    );
}

#[test]
fn input_without_shape() {
    check(
        "input_without_shape",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = { domain = "unit_norm" }
v = "[V]"
"#,
        r#"bad/input_without_shape.toml:8:5: error: input `k` has no shape
  |
8 | k = { domain = "unit_norm" }
  |     ^^^^^^^^^^^^^^^^^^^^^^^^ `shape` is missing
  = help: add shape = "scalar", "[K]" or "[V]" to `k`
"#,
    );
}

#[test]
fn input_wrong_type() {
    check(
        "input_wrong_type",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = 3
v = "[V]"
"#,
        r#"bad/input_wrong_type.toml:8:5: error: input `k` must be a shape string or a table, found an integer
  |
8 | k = 3
  |     ^ expected a shape or a table
  = help: write k = "[K]" or k = { shape = "[K]", domain = "any" }
"#,
    );
}

#[test]
fn bad_shape() {
    check(
        "bad_shape",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[D]"
v = "[V]"
"#,
        r#"bad/bad_shape.toml:8:5: error: bad shape `[D]` for input `k`
  |
8 | k = "[D]"
  |     ^^^^^ not a shape
  = help: shapes are "scalar", "[K]" and "[V]"
"#,
    );
}

#[test]
fn bad_domain() {
    check(
        "bad_domain",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = { shape = "[K]", domain = "normalized" }
v = "[V]"
"#,
        r#"bad/bad_domain.toml:8:31: error: unknown domain `normalized` for input `k`
  |
8 | k = { shape = "[K]", domain = "normalized" }
  |                               ^^^^^^^^^^^^ not a domain
  = help: domains are any, log_gate, unit, positive, unit_norm, negative
"#,
    );
}

#[test]
fn unit_norm_on_scalar() {
    check(
        "unit_norm_on_scalar",
        r#"name = "r"
step = '''
S = g * S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
g = { shape = "scalar", domain = "unit_norm" }
"#,
        r#"bad/unit_norm_on_scalar.toml:10:34: error: `unit_norm` needs a vector, but `g` is a scalar
   |
10 | g = { shape = "scalar", domain = "unit_norm" }
   |                                  ^^^^^^^^^^^ only for [K] or [V] inputs
   = help: give the input a vector shape, or pick another domain (any, log_gate, unit, positive, negative)
"#,
    );
}

#[test]
fn per_head_not_bool() {
    check(
        "per_head_not_bool",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = { shape = "[K]", per_head = "yes" }
v = "[V]"
"#,
        r#"bad/per_head_not_bool.toml:8:33: error: `per_head` of `k` must be a boolean, found a string
  |
8 | k = { shape = "[K]", per_head = "yes" }
  |                                 ^^^^^ expected true or false
  = help: write per_head = true or per_head = false (no quotes)
"#,
    );
}

#[test]
fn invalid_input_name() {
    check(
        "invalid_input_name",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"2k" = "[K]"
"#,
        r#"bad/invalid_input_name.toml:10:1: error: invalid input name `2k`
   |
10 | "2k" = "[K]"
   | ^^^^ not an identifier
   = help: input names are a letter or `_` followed by letters, digits or `_`
"#,
    );
}

#[test]
fn reserved_input_name() {
    check(
        "reserved_input_name",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
scale = "scalar"
"#,
        r#"bad/reserved_input_name.toml:10:1: error: `scale` is reserved and cannot name an input
   |
10 | scale = "scalar"
   | ^^^^^ reserved name
   = help: rename the input; S, o, scale, head and the functions (exp, exp2, log, sigmoid, softplus, silu, sqrt, abs, tanh, relu, min, max, clip, where, pow, l2norm, sum, dot, outer) are reserved
"#,
    );
}

#[test]
fn state_tensor_as_input_name() {
    check(
        "state_tensor_as_input_name",
        r#"name = "r"
step = '''
S = S + outer(k, h0)
o = S^T @ k
'''
[inputs]
k = "[K]"
h0 = "[V]"
"#,
        r#"bad/state_tensor_as_input_name.toml:8:1: error: `h0` names the initial state tensor and cannot name an input
  |
8 | h0 = "[V]"
  | ^^ reserved tensor name
  = help: rename the input; h0, hT, do, dhT name the states and their cotangents
"#,
    );
}

#[test]
fn statement_without_eq() {
    check(
        "statement_without_eq",
        r#"name = "r"
step = '''
S = S
  + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/statement_without_eq.toml:4:3: error: statement without `=`
  |
4 |   + outer(k, v)
  |   ^^^^^^^^^^^^^ expected `NAME = expr`
  = help: each line of the step is one assignment `NAME = expr` to S, o or a local; a statement continues on the next line only while a parenthesis is open
"#,
    );
}

#[test]
fn assign_to_non_identifier() {
    check(
        "assign_to_non_identifier",
        r#"name = "r"
step = '''
S^T = S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/assign_to_non_identifier.toml:3:1: error: cannot assign to `S^T`
  |
3 | S^T = S + outer(k, v)
  | ^^^ not a name
  = help: the left side of `=` must be a single name: S, o or a local
"#,
    );
}

#[test]
fn second_equals() {
    check(
        "second_equals",
        r#"name = "r"
step = '''
S = S + outer(k, v) = S
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/second_equals.toml:3:21: error: unexpected `=` after the expression
  |
3 | S = S + outer(k, v) = S
  |                     ^ a second `=`
  = help: a statement has one `=`; put each assignment on its own line
"#,
    );
}

#[test]
fn unclosed_paren() {
    check(
        "unclosed_paren",
        r#"name = "r"
step = '''
S = S + outer(k, v
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/unclosed_paren.toml:3:14: error: unclosed `(`
  |
3 | S = S + outer(k, v
  |              ^ this parenthesis is never closed
  = help: add the missing `)`; a statement runs on over the next lines while a parenthesis is open
"#,
    );
}

#[test]
fn unmatched_close_paren() {
    check(
        "unmatched_close_paren",
        r#"name = "r"
step = '''
S = S + outer(k, v))
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/unmatched_close_paren.toml:3:20: error: unmatched `)`
  |
3 | S = S + outer(k, v))
  |                    ^ no `(` before this
  = help: remove this `)` or add the `(` that it closes
"#,
    );
}

#[test]
fn missing_operand() {
    check(
        "missing_operand",
        r#"name = "r"
step = '''
S = S + * outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/missing_operand.toml:3:9: error: expected an expression, found `*`
  |
3 | S = S + * outer(k, v)
  |         ^ expected an operand
  = help: an operand is missing here: a number, a name, a call like exp(x) or a parenthesized expression
"#,
    );
}

#[test]
fn trailing_token() {
    check(
        "trailing_token",
        r#"name = "r"
step = '''
S = S + outer(k, v) k
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/trailing_token.toml:3:21: error: unexpected `k` after the expression
  |
3 | S = S + outer(k, v) k
  |                     ^ expected an operator or the end of the line
  = help: write an operator (+ - * / @) between two operands, or start a new line for a new statement
"#,
    );
}

#[test]
fn bad_number() {
    check(
        "bad_number",
        r#"name = "r"
step = '''
S = 0.9.5 * S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/bad_number.toml:3:5: error: bad number `0.9.5`
  |
3 | S = 0.9.5 * S + outer(k, v)
  |     ^^^^^ not a number
  = help: numbers are written like 1, 0.5, .5, 1e-3 or 2.5E+2; put an operator between a number and a name
"#,
    );
}

#[test]
fn caret_without_t() {
    check(
        "caret_without_t",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S^2 @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/caret_without_t.toml:4:6: error: `^` must be followed by `T`
  |
4 | o = S^2 @ q
  |      ^ expected `^T`
  = help: `^T` transposes the state, as in S^T @ q; for a power write pow(a, b)
"#,
    );
}

#[test]
fn unexpected_character() {
    check(
        "unexpected_character",
        r#"name = "r"
step = '''
S = S + outer(k, v) $
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/unexpected_character.toml:3:21: error: unexpected character `$`
  |
3 | S = S + outer(k, v) $
  |                     ^ not part of the step language
  = help: a step is made of names, numbers, `+ - * / @ ^T`, comparisons (`< <= > >= == !=`), parentheses, commas, `=` and # comments
"#,
    );
}

#[test]
fn unknown_name() {
    check(
        "unknown_name",
        r#"name = "r"
step = '''
S = S + outer(kk, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/unknown_name.toml:3:15: error: unknown name `kk`
  |
3 | S = S + outer(kk, v)
  |               ^^ not an input, a local or a built-in
  = help: did you mean `k`? the inputs are q, k, v; the built-ins are S, scale and head
"#,
    );
}

#[test]
fn unknown_function() {
    check(
        "unknown_function",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S^T @ softmax(q)
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/unknown_function.toml:4:11: error: unknown function `softmax`
  |
4 | o = S^T @ softmax(q)
  |           ^^^^^^^ not a function
  = help: the functions are exp, exp2, log, sigmoid, softplus, silu, sqrt, abs, tanh, relu, min, max, clip, where, pow, l2norm, sum, dot, outer
"#,
    );
}

#[test]
fn wrong_argument_count() {
    check(
        "wrong_argument_count",
        r#"name = "r"
step = '''
S = S + outer(k)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/wrong_argument_count.toml:3:9: error: `outer` takes 2 arguments, found 1
  |
3 | S = S + outer(k)
  |         ^^^^^^^^ 1 given
  = help: call it as outer(a, b)
"#,
    );
}

#[test]
fn elementwise_k_with_v() {
    check(
        "elementwise_k_with_v",
        r#"name = "r"
step = '''
S = S + k * v
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/elementwise_k_with_v.toml:3:11: error: type mismatch in `*`: a [K] vector and a [V] vector
  |
3 | S = S + k * v
  |           ^ [K] * [V]
  = help: elementwise operations need two vectors of the same kind, or a scalar; did you mean outer(k, v)?
"#,
    );
}

#[test]
fn pow_k_with_v() {
    check(
        "pow_k_with_v",
        r#"name = "r"
step = '''
S = S + outer(k, pow(v, k))
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/pow_k_with_v.toml:3:18: error: type mismatch in `pow`: a [V] vector and a [K] vector
  |
3 | S = S + outer(k, pow(v, k))
  |                  ^^^^^^^^^ pow([V], [K])
  = help: elementwise operations need two vectors of the same kind, or a scalar; did you mean outer(k, v)?
"#,
    );
}

#[test]
fn matmul_mismatch() {
    check(
        "matmul_mismatch",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/matmul_mismatch.toml:4:7: error: type mismatch in `@`: a [K, V] matrix @ a [K] vector
  |
4 | o = S @ q
  |       ^ [K, V] matrix @ [K]
  = help: with a [K, V] matrix on the left, `@` takes a [V] vector (giving a [K] vector); to multiply by a [K] vector transpose the matrix: S^T @ q
"#,
    );
}

#[test]
fn transpose_scalar() {
    check(
        "transpose_scalar",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S^T @ q * scale^T
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/transpose_scalar.toml:4:15: error: cannot transpose the scalar `scale`
  |
4 | o = S^T @ q * scale^T
  |               ^^^^^^^ `^T` on a scalar
  = help: `^T` transposes the state matrix (and does nothing to vectors); remove it here
"#,
    );
}

#[test]
fn outer_swapped() {
    check(
        "outer_swapped",
        r#"name = "r"
step = '''
S = S + outer(v, k)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/outer_swapped.toml:3:9: error: `outer` takes the [K] vector first, found [V] and [K]
  |
3 | S = S + outer(v, k)
  |         ^^^^^^^^^^^ [V] x [K]
  = help: swap the arguments: outer(k, v)
"#,
    );
}

#[test]
fn dot_mismatch() {
    check(
        "dot_mismatch",
        r#"name = "r"
step = '''
S = S + outer(k, v) * dot(q, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/dot_mismatch.toml:3:30: error: `dot` needs a [K] vector like its first argument, found a [V] vector
  |
3 | S = S + outer(k, v) * dot(q, v)
  |                              ^ [V]
  = help: dot(a, b) takes two [K] vectors or two [V] vectors; for a [K] and a [V] vector use outer(a, b)
"#,
    );
}

#[test]
fn sum_of_scalar() {
    check(
        "sum_of_scalar",
        r#"name = "r"
step = '''
S = S + outer(k, v) * sum(scale)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/sum_of_scalar.toml:3:27: error: `sum` needs a [K] or [V] vector, found a scalar
  |
3 | S = S + outer(k, v) * sum(scale)
  |                           ^^^^^ scalar
  = help: sum(x) adds up the entries of a [K] or [V] vector
"#,
    );
}

#[test]
fn transposed_matrix_in_add() {
    check(
        "transposed_matrix_in_add",
        r#"name = "r"
step = '''
S = S^T + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/transposed_matrix_in_add.toml:3:5: error: `S^T` is a transposed matrix, used as an operand of `+`
  |
3 | S = S^T + outer(k, v)
  |     ^^^ a [V, K] matrix
  = help: a transposed matrix can only be the left operand of `@`, as in S^T @ q; drop the ^T or use it that way
"#,
    );
}

#[test]
fn transposed_matrix_under_minus() {
    check(
        "transposed_matrix_under_minus",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = -S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/transposed_matrix_under_minus.toml:4:6: error: `S^T` is a transposed matrix, used under a unary minus
  |
4 | o = -S^T @ q
  |      ^^^ a [V, K] matrix
  = help: `-S^T @ q` reads as (-S^T) @ q; write -(S^T @ q) instead
"#,
    );
}

#[test]
fn transposed_matrix_in_function() {
    check(
        "transposed_matrix_in_function",
        r#"name = "r"
step = '''
S = exp(S^T) + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/transposed_matrix_in_function.toml:3:9: error: `S^T` is a transposed matrix, used as an argument of `exp`
  |
3 | S = exp(S^T) + outer(k, v)
  |         ^^^ a [V, K] matrix
  = help: a transposed matrix can only be the left operand of `@`, as in S^T @ q; drop the ^T or use it that way
"#,
    );
}

#[test]
fn wrong_type_for_state() {
    check(
        "wrong_type_for_state",
        r#"name = "r"
step = '''
S = S @ v
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/wrong_type_for_state.toml:3:5: error: `S` must be assigned a [K, V] matrix, found a [K] vector
  |
3 | S = S @ v
  |     ^^^^^ [K]
  = help: `S` is a [K, V] matrix, as in S = S + outer(k, v)
"#,
    );
}

#[test]
fn wrong_type_for_output() {
    check(
        "wrong_type_for_output",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S @ v
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/wrong_type_for_output.toml:4:5: error: `o` must be assigned a [V] vector, found a [K] vector
  |
4 | o = S @ v
  |     ^^^^^ [K]
  = help: `o` is a [V] vector, as in o = S^T @ q
"#,
    );
}

#[test]
fn local_changes_type() {
    check(
        "local_changes_type",
        r#"name = "r"
step = '''
x = k
S = S + outer(x, v)
x = v
o = S^T @ q + x
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/local_changes_type.toml:5:5: error: local `x` changes type: it was a [K] vector, here it is a [V] vector
  |
5 | x = v
  |     ^ [V]
  = help: a local keeps the type of its first assignment (line 3); use a new name for this value
"#,
    );
}

#[test]
fn local_shadows_input() {
    check(
        "local_shadows_input",
        r#"name = "r"
step = '''
k = l2norm(k)
S = S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/local_shadows_input.toml:3:1: error: local `k` would shadow the input `k`
  |
3 | k = l2norm(k)
  | ^ an input has this name
  = help: inputs cannot be reassigned; give the local another name
"#,
    );
}

#[test]
fn assign_to_builtin() {
    check(
        "assign_to_builtin",
        r#"name = "r"
step = '''
scale = 0.5
S = S + outer(k, v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/assign_to_builtin.toml:3:1: error: cannot assign to the built-in `scale`
  |
3 | scale = 0.5
  | ^^^^^ reserved name
  = help: assign to S, o or a local with another name; scale, head and the functions (exp, exp2, log, sigmoid, softplus, silu, sqrt, abs, tanh, relu, min, max, clip, where, pow, l2norm, sum, dot, outer) are reserved
"#,
    );
}

#[test]
fn local_used_before_assignment() {
    check(
        "local_used_before_assignment",
        r#"name = "r"
step = '''
S = S + outer(kn, v)
kn = l2norm(k)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/local_used_before_assignment.toml:3:15: error: local `kn` is used before it is assigned
  |
3 | S = S + outer(kn, v)
  |               ^^ first assigned on line 4
  = help: assign `kn` in an earlier statement, or move its assignment above this one
"#,
    );
}

#[test]
fn output_is_read() {
    check(
        "output_is_read",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S^T @ q
o = o * 2
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/output_is_read.toml:5:5: error: the output `o` cannot be read
  |
5 | o = o * 2
  |     ^ `o` is write-only
  = help: compute the value into a local (y = ...), use y here, and assign o = y
"#,
    );
}

#[test]
fn function_as_value() {
    check(
        "function_as_value",
        r#"name = "r"
step = '''
S = S + outer(k, v) * exp
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/function_as_value.toml:3:23: error: `exp` is a function, not a value
  |
3 | S = S + outer(k, v) * exp
  |                       ^^^ function without arguments
  = help: call it with parentheses, e.g. exp(x)
"#,
    );
}

#[test]
fn output_never_assigned() {
    check(
        "output_never_assigned",
        r#"name = "r"
step = '''
S = S + outer(k, v)
y = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/output_never_assigned.toml:2:1: error: the step never assigns the output `o`
  |
2 | step = '''
  | ^^^^ no `o = ...` in this step
  = help: add a statement `o = ...` that computes the [V] output, e.g. o = scale * S^T @ q
"#,
    );
}

#[test]
fn state_never_assigned() {
    check(
        "state_never_assigned",
        r#"name = "r"
step = '''
o = S^T @ q + 0 * dot(k, k) * v
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/state_never_assigned.toml:2:1: error: the step never updates the state `S`
  |
2 | step = '''
  | ^^^^ no `S = ...` in this step
  = help: add a statement `S = ...` that computes the new [K, V] state, e.g. S = S + outer(k, v)
"#,
    );
}

#[test]
fn input_never_used() {
    check(
        "input_never_used",
        r#"name = "r"
step = '''
S = S + outer(k, v)
o = S^T @ k
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/input_never_used.toml:7:1: error: input `q` is never used
  |
7 | q = "[K]"
  | ^ declared here
  = help: remove `q` from [inputs], or use it in the step
"#,
    );
}

#[test]
fn error_inside_escaped_string() {
    check(
        "error_inside_escaped_string",
        r#"name = "r"
step = "S = S + outer(k, v)\n\to = S^T @ qq"
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/error_inside_escaped_string.toml:2:42: error: unknown name `qq`
  |
2 | step = "S = S + outer(k, v)\n\to = S^T @ qq"
  |                                          ^^ not an input, a local or a built-in
  = help: did you mean `q`? the inputs are q, k, v; the built-ins are S, scale and head
"#,
    );
}

#[test]
fn error_in_multiline_basic_string() {
    check(
        "error_in_multiline_basic_string",
        r#"name = "r"
step = """
S = S + \
    outer(k, v)
\u006F = S^T @ q + \
   kk
"""
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/error_in_multiline_basic_string.toml:6:4: error: unknown name `kk`
  |
6 |    kk
  |    ^^ not an input, a local or a built-in
  = help: did you mean `k`? the inputs are q, k, v; the built-ins are S, scale and head
"#,
    );
}

#[test]
fn chained_comparison() {
    check(
        "chained_comparison",
        r#"name = "r"
step = '''
S = S + outer(where(0 < k < 1, k, 0), v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/chained_comparison.toml:3:27: error: comparisons do not chain
  |
3 | S = S + outer(where(0 < k < 1, k, 0), v)
  |                           ^ a second comparison
  = help: write each comparison separately and combine them, e.g. (a < b) * (b < c)
"#,
    );
}

#[test]
fn clip_arity() {
    check(
        "clip_arity",
        r#"name = "r"
step = '''
S = S + outer(clip(k, 1), v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/clip_arity.toml:3:15: error: `clip` takes 3 arguments, found 2
  |
3 | S = S + outer(clip(k, 1), v)
  |               ^^^^^^^^^^ 2 given
  = help: call it as clip(x, lo, hi)
"#,
    );
}

#[test]
fn min_of_a_key_and_a_value() {
    check(
        "min_of_a_key_and_a_value",
        r#"name = "r"
step = '''
S = S + outer(k, min(v, k))
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/min_of_a_key_and_a_value.toml:3:18: error: type mismatch in `min`: a [V] vector and a [K] vector
  |
3 | S = S + outer(k, min(v, k))
  |                  ^^^^^^^^^ min([V], [K])
  = help: the arguments of `min` combine elementwise: vectors of one kind ([K] or [V]), a scalar with either; `v` is a [V] vector and `k` is a [K] vector
"#,
    );
}

#[test]
fn where_branches_of_two_kinds() {
    check(
        "where_branches_of_two_kinds",
        r#"name = "r"
step = '''
S = S + outer(k, where(v > 0, v, q))
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/where_branches_of_two_kinds.toml:3:18: error: type mismatch in `where`: a [V] vector and a [K] vector
  |
3 | S = S + outer(k, where(v > 0, v, q))
  |                  ^^^^^^^^^^^^^^^^^^ where([V], [K])
  = help: the arguments of `where` combine elementwise: vectors of one kind ([K] or [V]), a scalar with either; `v > 0` is a [V] vector and `q` is a [K] vector
"#,
    );
}

#[test]
fn a_lone_exclamation_mark() {
    check(
        "a_lone_exclamation_mark",
        r#"name = "r"
step = '''
S = S + outer(where(!k, k, 0), v)
o = S^T @ q
'''
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
        r#"bad/a_lone_exclamation_mark.toml:3:21: error: `!` is only part of `!=`
  |
3 | S = S + outer(where(!k, k, 0), v)
  |                     ^ no logical not in the step language
  = help: to negate a condition c write c == 0, or compare the other way (a >= b for !(a < b))
"#,
    );
}

/// A rule with a [K] state `n` beside S, and the `[states]` table `states` after its inputs.
fn with_states(states: &str) -> String {
    format!(
        r#"name = "r"
step = """
S = S + outer(k, v)
n = n + k
o = S^T @ q + dot(n, q)
"""
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
{states}"#
    )
}

#[test]
fn second_matrix() {
    check(
        "second_matrix",
        &with_states(
            r#"[states]
n = "[K,V]"
"#,
        ),
        r#"bad/second_matrix.toml:12:1: error: a second [K, V] state (`n`) is not supported
   |
12 | n = "[K,V]"
   | ^ only S is a matrix
   = help: a rule has one matrix state, S; other states are [K] or [V] vectors
"#,
    );
}

#[test]
fn bad_state_shape() {
    check(
        "bad_state_shape",
        &with_states(
            r#"[states]
n = "[Q]"
"#,
        ),
        r#"bad/bad_state_shape.toml:12:5: error: bad shape `[Q]` for state `n`
   |
12 | n = "[Q]"
   |     ^^^^^ not a state shape
   = help: a [states] entry is S = "[K,V]" or a vector state, name = "[K]" or name = "[V]"
"#,
    );
}

#[test]
fn never_updated() {
    check(
        "never_updated",
        &with_states(
            r#"[states]
n = "[K]"
m = "[V]"
"#,
        ),
        r#"bad/never_updated.toml:13:1: error: state `m` is never updated
   |
13 | m = "[V]"
   | ^ declared here
   = help: add a statement `m = ...` to the step, or remove `m` from [states]
"#,
    );
}

#[test]
fn s_not_matrix() {
    check(
        "s_not_matrix",
        &with_states(
            r#"[states]
S = "[K]"
n = "[K]"
"#,
        ),
        r#"bad/s_not_matrix.toml:12:5: error: the state `S` is [K, V], not `[K]`
   |
12 | S = "[K]"
   |     ^^^^^ S is the [K, V] state
   = help: write S = "[K,V]" (or leave it out: it is the default); a vector state takes another name
"#,
    );
}

#[test]
fn state_is_input() {
    check(
        "state_is_input",
        r#"name = "r"
step = """
S = S + outer(k, v)
q = q + k
o = S^T @ q + dot(n, q)
"""
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
[states]
q = "[K]"
"#,
        r#"bad/state_is_input.toml:12:1: error: state `q` collides with the input `q`
   |
12 | q = "[K]"
   | ^ state declared here
   = help: the state `q` owns the names q, q0, qT, dq0, dqT; rename the state or the input
"#,
    );
}

#[test]
fn state_tensor_clash() {
    check(
        "state_tensor_clash",
        r#"name = "r"
step = """
S = S + outer(k, v)
n = n + k
o = S^T @ q + dot(n, q + n0)
"""
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
n0 = "[K]"
[states]
n = "[K]"
"#,
        r#"bad/state_tensor_clash.toml:13:1: error: state `n` collides with the input `n0`
   |
13 | n = "[K]"
   | ^ state declared here
   = help: the state `n` owns the names n, n0, nT, dn0, dnT; rename the state or the input
"#,
    );
}
