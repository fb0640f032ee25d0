//! Errors the operator can fix: bad input or a refusal to touch a disk.
//!
//! They are printed as one paragraph naming the problem and the fix, without the
//! backtrace-like context chain that unexpected failures get.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserError {
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} Fix: {}", self.problem, self.fix)
    }
}

impl std::error::Error for UserError {}

/// Builds an `anyhow::Error` that `main` prints as a plain paragraph.
pub fn user_error(problem: impl Into<String>, fix: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UserError {
        problem: problem.into(),
        fix: fix.into(),
    })
}

/// Finds a `UserError` anywhere in the chain, so context added on the way up does not hide it.
pub fn as_user_error(err: &anyhow::Error) -> Option<&UserError> {
    err.chain().find_map(|cause| cause.downcast_ref::<UserError>())
}

/// One line for the console's final `result: failure: ...` line.
pub fn one_line(err: &anyhow::Error) -> String {
    let text = match as_user_error(err) {
        Some(user) => user.to_string(),
        None => format!("{err:#}"),
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A clap value parser from one of our input parsers, its error as the one line `main` prints.
pub fn typed<T>(parse: fn(&str) -> anyhow::Result<T>) -> impl Fn(&str) -> Result<T, String> + Clone {
    move |text| parse(text).map_err(|e| one_line(&e))
}
