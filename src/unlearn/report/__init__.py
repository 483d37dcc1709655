"""Reports: `build` (markdown, HTML, summary JSON and plots over evaluation folders) and `restor`
(the RESTOR section of a report)."""
