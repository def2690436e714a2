//! Typed errors. Database errors keep their SQLSTATE, so a caller can tell a
//! lost lease from an unknown workflow from a dropped connection.

use uuid::Uuid;

/// SQLSTATE raised by pg_baton when a lease is no longer held.
pub const LEASE_LOST: &str = "BT001";

/// SQLSTATE `object_not_in_prerequisite_state`: an operation on a run in the
/// wrong state.
const WRONG_STATE: &str = "55000";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The step's lease was lost (expired and reclaimed, finished, cancelled,
    /// wrong token): SQLSTATE BT001. Whatever the step wrote in the same
    /// transaction must be rolled back.
    #[error("lease lost: {0}")]
    LeaseLost(String),
    /// Unknown workflow or run: SQLSTATE 42704.
    #[error("not found: {0}")]
    NotFound(String),
    /// Invalid definition or argument: SQLSTATE 22023 or 22004.
    #[error("invalid input ({code}): {message}")]
    InvalidInput { code: String, message: String },
    /// The run is not in a state the operation works on (resuming a run
    /// that has not failed, deleting an unfinished one without `force`):
    /// SQLSTATE 55000. Nothing changed.
    #[error("wrong state: {message}")]
    WrongState { message: String },
    /// Any other error the database reported.
    #[error("database error ({code}): {message}")]
    Database { code: String, message: String },
    /// The connection failed or closed (no SQLSTATE).
    #[error("connection error: {0}")]
    Connection(#[source] tokio_postgres::Error),
    /// The connection string's TLS options cannot be used (`sslmode`,
    /// `sslrootcert`): named in the message.
    #[error("TLS: {0}")]
    Tls(String),
    #[error("connection pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("connection pool setup: {0}")]
    PoolSetup(String),
    /// An input or output did not (de)serialize as the requested type.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("run {run_id} failed: {error}")]
    RunFailed { run_id: Uuid, error: String },
    #[error("run {run_id} was cancelled")]
    RunCancelled { run_id: Uuid },
    #[error("timed out waiting for run {run_id}")]
    Timeout { run_id: Uuid },
    /// `Client::wait_event_value`: the key was not set in time.
    #[error("timed out waiting for event {key:?} of run {run_id}")]
    EventTimeout { run_id: Uuid, key: String },
}

impl Error {
    /// The SQLSTATE, for errors the database raised.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::LeaseLost(_) => Some(LEASE_LOST),
            Error::NotFound(_) => Some("42704"),
            Error::WrongState { .. } => Some(WRONG_STATE),
            Error::InvalidInput { code, .. } | Error::Database { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Error::LeaseLost(_))
    }

    /// Whether the same call may succeed if tried again (on a new connection
    /// from the pool): the connection broke or could not be made, or the
    /// database gave up for a passing reason: a serialization failure or
    /// deadlock (SQLSTATE class 40, e.g. `40001`, `40P01`), the server
    /// shutting down or not accepting connections yet (`57P01`, `57P02`,
    /// `57P03`), a cancelled statement or a lock timeout (`57014`, `55P03`),
    /// resources running out (class 53, e.g. too many connections), a
    /// connection exception (class 08), or a read-only server (`25006`: a
    /// standby, as after a failover, until the pool reaches the new primary).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connection(e) => is_broken(e),
            Error::Pool(deadpool_postgres::PoolError::Timeout(_)) => true,
            Error::Pool(deadpool_postgres::PoolError::Backend(e)) => match e.code() {
                Some(code) => transient_sqlstate(code.code()),
                None => is_broken(e),
            },
            _ => self.sqlstate().is_some_and(transient_sqlstate),
        }
    }

    /// Whether the database refused a value (SQLSTATE class 22, data
    /// exception: e.g. `22P05`, a NUL character in a JSON string, which
    /// jsonb cannot store).
    pub fn is_data_error(&self) -> bool {
        self.sqlstate().is_some_and(|code| code.starts_with("22"))
    }
}

fn transient_sqlstate(code: &str) -> bool {
    matches!(&code[..code.len().min(2)], "08" | "40" | "53")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "57014" | "55P03" | "25006"
        )
}

/// A connection that broke or could not be made (not a parameter or row that
/// did not convert, which trying again would not change).
fn is_broken(e: &tokio_postgres::Error) -> bool {
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    let text = e.to_string();
    e.is_closed()
        || io
        || text.starts_with("error connecting to server")
        || text.starts_with("timeout waiting for server")
        || text.starts_with("error communicating with the server")
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        let Some(db) = e.as_db_error() else {
            return Error::Connection(e);
        };
        let message = db.message().to_string();
        match db.code().code() {
            LEASE_LOST => Error::LeaseLost(message),
            "42704" => Error::NotFound(message),
            WRONG_STATE => Error::WrongState { message },
            code @ ("22023" | "22004") => Error::InvalidInput {
                code: code.to_string(),
                message,
            },
            code => Error::Database {
                code: code.to_string(),
                message,
            },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_and_data_errors_by_sqlstate() {
        let db = |code: &str| Error::Database {
            code: code.to_string(),
            message: String::new(),
        };
        for code in [
            "40001", "40P01", "57P01", "57P03", "08006", "53300", "55P03", "57014",
        ] {
            assert!(db(code).is_transient(), "{code}");
            assert!(!db(code).is_data_error(), "{code}");
        }
        for code in ["22P05", "23505", "42883", "XX000", "P0001"] {
            assert!(!db(code).is_transient(), "{code}");
        }
        assert!(db("22P05").is_data_error());
        let invalid = Error::InvalidInput {
            code: "22023".to_string(),
            message: String::new(),
        };
        assert!(invalid.is_data_error() && !invalid.is_transient());
        assert!(!Error::LeaseLost(String::new()).is_transient());
        let wrong = Error::WrongState {
            message: String::new(),
        };
        assert_eq!(wrong.sqlstate(), Some("55000"));
        assert!(!wrong.is_transient() && !wrong.is_data_error());
    }
}
