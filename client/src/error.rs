//! Typed errors. Database errors keep their SQLSTATE, so a caller can tell a
//! lost lease from an unknown workflow from a dropped connection.

use uuid::Uuid;

/// SQLSTATE raised by pg_baton when a lease is no longer held.
pub const LEASE_LOST: &str = "BT001";

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
    /// Any other error the database reported.
    #[error("database error ({code}): {message}")]
    Database { code: String, message: String },
    /// The connection failed or closed (no SQLSTATE).
    #[error("connection error: {0}")]
    Connection(#[source] tokio_postgres::Error),
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
}

impl Error {
    /// The SQLSTATE, for errors the database raised.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::LeaseLost(_) => Some(LEASE_LOST),
            Error::NotFound(_) => Some("42704"),
            Error::InvalidInput { code, .. } | Error::Database { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Error::LeaseLost(_))
    }
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
