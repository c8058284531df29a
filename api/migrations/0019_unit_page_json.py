# Written by hand: the unit's JSON as GET /api/units/ renders it, kept on the unit's row.

from django.db import migrations, models

# nd_unit_page_json(unit): the JSON object of one unit as GET /api/units/ renders it
# (api.serializers.UnitSerializer's fields in its order, margin and iou_ci derived as it does),
# written as compact text by concatenation. Numbers render as float8out does (shortest exact),
# non-finite ones quoted as json_build_object quotes them; strings escape through to_json. Top
# concepts: the unit's own copy (top_concepts_json, migration 0015), else its score rows.
#
# Unit.page_json holds it, written by a row trigger on every insert and on every update of a
# column it reads (whatever the statement sends), so that a page of units (api.unit_page) reads
# one column instead of building 100 objects per request: about 2 ms of the database's ~3 ms
# per page. Building one costs about 0.1-0.15 ms (a 512-unit layer's insert 60-90 ms more).
# Left empty, and built at read time instead, where the unit has no top concepts of its own
# (its score rows are written after it), and on units stored before this migration (no
# backfill here: `manage.py concept_stats_rebuild` fills them). A model's new name is written
# into its units' pages; concept names never change (api.admin).
PAGE_JSON = """'{"id":' || (p.id)::text
    || ',"job":' || (p.job_id)::text
    || ',"model":' || (p.model_id)::text
    || ',"model_name":' || coalesce(to_json((SELECT name FROM nd_model WHERE id = p.model_id))::text, 'null')
    || ',"layer":' || coalesce(to_json(p.layer)::text, 'null')
    || ',"unit":' || (p.unit)::text
    || ',"label":' || coalesce(to_json((SELECT name FROM nd_concept WHERE id = p.label_id))::text, 'null')
    || ',"category":' || coalesce(to_json((SELECT category FROM nd_concept WHERE id = p.label_id))::text, 'null')
    || ',"iou":' || CASE WHEN abs(p.iou) < 'Infinity' THEN (p.iou)::text WHEN (p.iou) IS NULL THEN 'null' ELSE '"' || (p.iou)::text
    || '"' END
    || ',"threshold":' || CASE WHEN abs(p.threshold) < 'Infinity' THEN (p.threshold)::text WHEN (p.threshold) IS NULL THEN 'null' ELSE '"' || (p.threshold)::text
    || '"' END
    || ',"top_concepts":' || coalesce(nullif(p.top_concepts_json, ''), (
        SELECT json_agg(json_build_object('concept', c.name, 'category', c.category, 'iou', s.iou, 'rank', s.rank)
                        ORDER BY s.rank)::text
        FROM nd_unit_concept s
        CROSS JOIN LATERAL (SELECT c.name, c.category FROM nd_concept c WHERE c.id = s.concept_id OFFSET 0) c
        WHERE s.unit_id = p.id), '[]')
    || ',"iou_ci":' || CASE WHEN p.iou_low IS NULL OR p.iou_high IS NULL THEN 'null' ELSE '[' || CASE WHEN abs(p.iou_low) < 'Infinity' THEN (p.iou_low)::text WHEN (p.iou_low) IS NULL THEN 'null' ELSE '"' || (p.iou_low)::text
    || '"' END
    || ',' || CASE WHEN abs(p.iou_high) < 'Infinity' THEN (p.iou_high)::text WHEN (p.iou_high) IS NULL THEN 'null' ELSE '"' || (p.iou_high)::text
    || '"' END
    || ']' END
    || ',"stability":' || CASE WHEN abs(p.stability) < 'Infinity' THEN (p.stability)::text WHEN (p.stability) IS NULL THEN 'null' ELSE '"' || (p.stability)::text
    || '"' END
    || ',"runner_up":' || coalesce(to_json((SELECT name FROM nd_concept WHERE id = p.runner_up_id))::text, 'null')
    || ',"runner_up_category":' || coalesce(to_json((SELECT category FROM nd_concept WHERE id = p.runner_up_id))::text, 'null')
    || ',"runner_up_iou":' || CASE WHEN abs(p.runner_up_iou) < 'Infinity' THEN (p.runner_up_iou)::text WHEN (p.runner_up_iou) IS NULL THEN 'null' ELSE '"' || (p.runner_up_iou)::text
    || '"' END
    || ',"margin":' || CASE WHEN abs(p.iou - p.runner_up_iou) < 'Infinity' THEN (p.iou - p.runner_up_iou)::text WHEN (p.iou - p.runner_up_iou) IS NULL THEN 'null' ELSE '"' || (p.iou - p.runner_up_iou)::text
    || '"' END
    || ',"chance_iou":' || CASE WHEN abs(p.chance_iou) < 'Infinity' THEN (p.chance_iou)::text WHEN (p.chance_iou) IS NULL THEN 'null' ELSE '"' || (p.chance_iou)::text
    || '"' END
    || ',"p_value":' || CASE WHEN abs(p.p_value) < 'Infinity' THEN (p.p_value)::text WHEN (p.p_value) IS NULL THEN 'null' ELSE '"' || (p.p_value)::text
    || '"' END
    || '}'"""

FORWARD = f"""
CREATE FUNCTION nd_unit_page_json(p nd_unit) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT {PAGE_JSON}
$$;

CREATE FUNCTION nd_unit_page_json_set() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.page_json := CASE WHEN NEW.top_concepts_json <> '' THEN nd_unit_page_json(NEW) ELSE '' END;
    RETURN NEW;
END $$;
CREATE TRIGGER nd_unit_page_json_set BEFORE INSERT OR UPDATE OF
    id, job_id, model_id, layer, unit, label_id, iou, threshold, top_concepts_json, iou_low, iou_high,
    stability, runner_up_id, runner_up_iou, chance_iou, p_value, page_json
    ON nd_unit FOR EACH ROW EXECUTE FUNCTION nd_unit_page_json_set();

-- A model renamed: its units' pages written again (by the trigger above).
CREATE FUNCTION nd_unit_page_json_refresh() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE nd_unit SET page_json = '' WHERE model_id = NEW.id;
    RETURN NULL;
END $$;
CREATE TRIGGER nd_model_unit_page_json AFTER UPDATE OF name ON nd_model FOR EACH ROW
    WHEN (OLD.name IS DISTINCT FROM NEW.name)
    EXECUTE FUNCTION nd_unit_page_json_refresh();
"""

BACKWARD = """
DROP TRIGGER IF EXISTS nd_model_unit_page_json ON nd_model;
DROP TRIGGER IF EXISTS nd_unit_page_json_set ON nd_unit;
DROP FUNCTION IF EXISTS nd_unit_page_json_refresh();
DROP FUNCTION IF EXISTS nd_unit_page_json_set();
DROP FUNCTION IF EXISTS nd_unit_page_json(nd_unit);
"""


def _postgres(sql):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql)

    return run


class Migration(migrations.Migration):

    dependencies = [
        ("api", "0018_unit_audience"),
    ]

    operations = [
        migrations.AddField(
            model_name="unit",
            name="page_json",
            field=models.TextField(blank=True, db_default="", default="", editable=False),
        ),
        migrations.RunPython(_postgres(FORWARD), _postgres(BACKWARD)),
    ]
