-- The outbox: messages written inside the application's transaction, published
-- by the relay after commit. One row per message, in the order written.
CREATE TABLE IF NOT EXISTS broker_outbox (
    id             BIGSERIAL PRIMARY KEY,
    -- Rows of one key share a lane; one relay at a time owns a lane, so
    -- messages of one key are published in the order they were written.
    lane           INTEGER     NOT NULL,
    topic          TEXT        NOT NULL,
    message_id     TEXT        NOT NULL,
    msg_key        BYTEA,
    payload        BYTEA       NOT NULL,
    null_payload   BOOLEAN     NOT NULL DEFAULT FALSE,
    -- [[name, value], ...] in order, repeats kept; see broker-outbox/src/row.rs.
    headers        JSONB       NOT NULL DEFAULT '[]',
    content_type   TEXT,
    correlation_id TEXT,
    traceparent    TEXT,
    timestamp_ms   BIGINT      NOT NULL,
    amqp           JSONB,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at        TIMESTAMPTZ
);

-- What the relay reads: unsent rows of its lanes, oldest first.
CREATE INDEX IF NOT EXISTS broker_outbox_unsent ON broker_outbox (lane, id) WHERE sent_at IS NULL;
-- What cleanup deletes: sent rows past the retention.
CREATE INDEX IF NOT EXISTS broker_outbox_sent ON broker_outbox (sent_at) WHERE sent_at IS NOT NULL;

-- Relays listen on channel `broker_outbox`: one notification per inserting
-- statement, delivered when (and only if) the transaction commits.
CREATE OR REPLACE FUNCTION broker_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('broker_outbox', '');
    RETURN NULL;
END;
$$;
DROP TRIGGER IF EXISTS broker_outbox_notify ON broker_outbox;
CREATE TRIGGER broker_outbox_notify AFTER INSERT ON broker_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION broker_outbox_notify();

-- The inbox: message ids a consumer group has handled, recorded in the
-- handler's own transaction, so a redelivered message is skipped.
CREATE TABLE IF NOT EXISTS broker_inbox (
    consumer_group TEXT        NOT NULL,
    message_id     TEXT        NOT NULL,
    handled_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, message_id)
);
CREATE INDEX IF NOT EXISTS broker_inbox_handled ON broker_inbox (handled_at);
