"""The web console, served by the manager at `/`: server-rendered Jinja2 pages over the
same database and rules as the API, a stylesheet of its own, no JavaScript but a
page's refresh while a job runs, nothing fetched from elsewhere.

- `common.py`: the page shell: who is signed in (the session cookie), CSRF, rendering,
  forms, pagination;
- `csrf.py`: the tokens its forms carry;
- `chart.py`: traffic as an inline SVG, drawn here;
- `pages_*.py`: the pages, by subject.
"""
