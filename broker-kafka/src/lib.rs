//! Placeholder: the backend lands with its own issue.
