//! Cross-backend integration tests.
