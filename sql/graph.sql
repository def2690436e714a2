-- A run's shape, for tools that draw it (the dashboard, the CLI's `show`):
--
--   {"run":   {id, workflow, version, status, error, created_at, started_at,
--              finished_at, parent_id, forked_from},
--    "steps": [{name, kind, status, attempt, max_attempts, queue, worker,
--               started_at, finished_at, error, after,
--               "map":   {items, ready, running, succeeded, failed, ...}  (map steps)
--               "child_runs": [{id, status}]                               (workflow steps)
--              }, ...]                                  (in definition order)
--    "edges": [{"from": step, "to": step}, ...]}
--
-- A map step's items are counted by status, not listed (there may be
-- 100,000); a workflow step lists the child run of each of its attempts.
CREATE FUNCTION workflow_graph(id uuid) RETURNS jsonb
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    r baton.runs := baton._existing_run(id);
BEGIN
    RETURN jsonb_build_object(
        'run', jsonb_build_object('id', r.id, 'workflow', r.workflow, 'version', r.version, 'status', r.status,
                                  'error', r.error, 'created_at', r.created_at, 'started_at', r.started_at,
                                  'finished_at', r.finished_at, 'parent_id', r.parent_id,
                                  'forked_from', r.forked_from),
        'steps', coalesce((
            SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                       'name', s.name, 'kind', s.kind, 'status', s.status, 'attempt', s.attempt,
                       'max_attempts', s.max_attempts, 'queue', s.queue, 'worker', s.worker,
                       'started_at', s.started_at, 'finished_at', s.finished_at, 'error', s.error,
                       'wait_for', s.wait_for,
                       'after', ARRAY(SELECT u.name FROM baton.steps u
                                       WHERE u.run_id = s.run_id AND u.step_no = ANY (s.upstream) ORDER BY u.step_no),
                       'map', CASE WHEN s.kind = 'map' THEN (
                                  SELECT jsonb_build_object('items', coalesce(sum(c.n), 0)) || coalesce(jsonb_object_agg(c.status, c.n), '{}')
                                    FROM (SELECT i.status::text AS status, count(*) AS n FROM baton.steps i
                                           WHERE i.run_id = s.run_id AND i.map_index IS NOT NULL
                                             AND i.downstream = ARRAY[s.step_no]
                                           GROUP BY i.status) c) END,
                       'child_runs', CASE WHEN s.kind = 'workflow' THEN (
                                  SELECT coalesce(jsonb_agg(jsonb_build_object('id', c.id, 'status', c.status)
                                                            ORDER BY c.created_at), '[]')
                                    FROM baton.runs c WHERE c.parent_id = s.run_id AND c.parent_step_no = s.step_no) END))
                   ORDER BY s.step_no)
              FROM baton.steps s WHERE s.run_id = r.id AND s.map_index IS NULL), '[]'),
        'edges', coalesce((
            SELECT jsonb_agg(jsonb_build_object('from', u.name, 'to', s.name) ORDER BY s.step_no, u.step_no)
              FROM baton.steps s
              JOIN baton.steps u ON u.run_id = s.run_id AND u.step_no = ANY (s.upstream)
             WHERE s.run_id = r.id AND s.map_index IS NULL), '[]'));
END $$;
