-- A target ($1) and its defended versions, with their defense, strength and facts.
SELECT model_version, role, defense, defense_strength, defense_facts FROM models
WHERE model_version = $1 OR (role = 'defended' AND base_version = $1)
