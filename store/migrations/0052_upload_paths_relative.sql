-- A video names its uploaded file relative to the data folder (uploads/<course>/<name>.upload), found wherever the
-- folder is moved or mounted: the absolute paths stored before are made so.
UPDATE videos SET file_path = substring(file_path from '(uploads/[^/]+/[^/]+\.upload)$')
WHERE file_path LIKE '/%' AND file_path ~ '/uploads/[^/]+/[^/]+\.upload$';
