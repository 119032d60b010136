//! Rule-file parsing (owned by the front-end work in progress).
