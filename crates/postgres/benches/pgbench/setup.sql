-- Scratch schema for the server-side comparison of the single-event append
-- statement (no client in the way): run after the store's migrations.
-- raw_events: the same row shape, plain INSERT; old_events + old_streams:
-- the version-row rule of schema version 1 (for comparison).
CREATE TABLE raw_events (LIKE vextrus_events INCLUDING ALL);
CREATE TABLE old_events (LIKE vextrus_events INCLUDING ALL);
CREATE TABLE old_streams (stream_id text PRIMARY KEY, version bigint NOT NULL);
CREATE SEQUENCE raw_versions;
