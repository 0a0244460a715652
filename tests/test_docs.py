"""docs/method.md: its numbering and anchors, and every reference to it in the repository.

Code, configs, tests and docs cite the method page as `docs/method.md §7.1`, `method.md §6-§7`,
`docs/method.md §5, §7.3, D1, D2`, `docs/method.md D6` or as a link `docs/method.md#s7-1`. These
tests check that each cited section, decision and anchor exists, that the page keeps the section
numbering code relies on (every numbered heading with its anchor `s<number, dots as dashes>`,
decisions with `d<n>`), and that no file still cites the working note the page replaces.

Pure text scanning of the tracked files (`git ls-files`; a directory walk without git): no jax, no
network, well under a second, independent of the working directory.
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / 'docs' / 'method.md'

# The numbering the page must keep: code cites these numbers, and the replacement of the old
# citations maps each old number to the same number here.
REQUIRED_SECTIONS = (
    '0', '1', '2', '3', '3.1', '3.2', '3.3', '3.4', '4', '5', '5.1', '5.2', '5.3', '6', '7',
    '7.1', '7.2', '7.3', '7.4', '8', '8.1', '8.2', '8.3', '8.4', '8.5', '9', '10', '11', '11.1',
    '11.2', '11.3', '11.4', '11.5', '11.6', '11.7', '12', '13')
REQUIRED_DECISIONS = tuple(f'D{i}' for i in range(1, 13))

MAX_BYTES = 4 * 1024 * 1024          # larger tracked files are data, not text that cites the page
SKIP_DIRS = {'.git', '.venv', 'venv', '__pycache__', 'build', 'dist', '.pytest_cache', 'runs',
             'node_modules'}

_NUM = r'\d+(?:\.\d+)*'
_ITEM = rf'(?:§\s*{_NUM}|D\d+\b)'
# `method.md` + a list of items joined by ',', '-', '–', '—', '/', '&' or 'and':
# "method.md §6-§7", "docs/method.md §5, §7.3, D1, D2", "docs/method.md D6".
REF = re.compile(rf'method\.md\s*({_ITEM}(?:\s*(?:,|-|–|—|/|&|and)?\s*{_ITEM})*)')
# Links: "docs/method.md#s7-1", "(method.md#d6)".
LINK = re.compile(r'method\.md#([A-Za-z0-9_-]+)')
SECTION_IN = re.compile(rf'§\s*({_NUM})')
DECISION_IN = re.compile(r'\b(D\d+)\b')

HEADING = re.compile(r'^#{1,6}[ \t]+(.*?)[ \t]*$', re.M)
HEADING_NUMBER = re.compile(rf'^(?:({_NUM})\.?|(D\d+)\.)\s')
ANCHOR = re.compile(r'<a\s+(?:id|name)="([^"]+)"\s*>\s*</a>')
FENCE = re.compile(r'^(```|~~~).*?^\1[ \t]*$', re.M | re.S)

# Citations of the unshipped working note: its name as a standalone upper-case word (with a section
# number, a decision id, '.md', a path or a possessive after it); longer identifiers that contain
# it do not match. The name is assembled so that this file does not cite the note itself.
NOTE_NAME = 'SP' + 'EC'
LEGACY = re.compile(r'\b' + NOTE_NAME + r'\b')


def section_anchor(number: str) -> str:
  """'7.1' -> 's7-1' (the page's anchor scheme for section headings)."""
  return 's' + number.replace('.', '-')


def _repo_files() -> List[pathlib.Path]:
  """Tracked files (`git ls-files`), or a walk of the tree when git is unavailable."""
  try:
    out = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True,
                         timeout=30).stdout
    names = [n for n in out.decode('utf-8', 'surrogateescape').split('\0') if n]
    if names:
      return [ROOT / n for n in names]
  except (OSError, subprocess.SubprocessError):
    pass
  files = []
  for dirpath, dirnames, filenames in os.walk(ROOT):
    dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith('.egg-info')]
    files.extend(pathlib.Path(dirpath) / f for f in filenames)
  return files


def _text_files() -> Iterator[Tuple[pathlib.Path, str]]:
  """(path, text) of every repository text file (binaries and huge files skipped)."""
  for path in _repo_files():
    try:
      if not path.is_file() or path.stat().st_size > MAX_BYTES:
        continue
      data = path.read_bytes()
    except OSError:
      continue
    if b'\0' in data[:8192]:
      continue
    yield path, data.decode('utf-8', 'replace')


def _line(text: str, pos: int) -> int:
  return text.count('\n', 0, pos) + 1


def _rel(path: pathlib.Path) -> str:
  try:
    return str(path.resolve().relative_to(ROOT))
  except ValueError:
    return str(path)


class Page:
  """The headings of docs/method.md: number -> anchors on that heading line, plus all anchors."""

  def __init__(self, text: str):
    self.sections: Dict[str, List[str]] = {}
    self.decisions: Dict[str, List[str]] = {}
    self.duplicates: List[str] = []
    for m in HEADING.finditer(FENCE.sub('', text)):   # '# comment' lines in code are no headings
      title = m.group(1)
      anchors = ANCHOR.findall(title)
      num = HEADING_NUMBER.match(title)
      if not num:
        continue
      key, table = (num.group(1), self.sections) if num.group(1) else (num.group(2),
                                                                         self.decisions)
      if key in table:
        self.duplicates.append(key)
      table[key] = anchors
    self.anchors: Set[str] = set(ANCHOR.findall(text))

  def has_section(self, number: str) -> bool:
    return number in self.sections

  def has_decision(self, name: str) -> bool:
    return name in self.decisions or name.lower() in self.anchors


@pytest.fixture(scope='module')
def page() -> Page:
  assert DOC.is_file(), f'{DOC} is missing: the method page is part of the project'
  return Page(DOC.read_text(encoding='utf-8'))


@pytest.fixture(scope='module')
def files() -> List[Tuple[pathlib.Path, str]]:
  return list(_text_files())


def test_page_keeps_numbering_and_anchors(page):
  missing = [n for n in REQUIRED_SECTIONS if not page.has_section(n)]
  assert not missing, f'docs/method.md lost the numbered sections {missing}: code cites them'
  missing = [d for d in REQUIRED_DECISIONS if not page.has_decision(d)]
  assert not missing, f'docs/method.md lost the decisions {missing}: code cites them'
  assert not page.duplicates, f'docs/method.md numbers these headings twice: {page.duplicates}'
  wrong = [f'§{n}: {a} (want {section_anchor(n)!r})' for n, a in page.sections.items()
           if section_anchor(n) not in a]
  wrong += [f'{d}: {a} (want {d.lower()!r})' for d, a in page.decisions.items()
            if d.lower() not in a]
  assert not wrong, ('docs/method.md headings without their stable anchor '
                     '(`## 7. Title <a id="s7"></a>`, `### D6. Title <a id="d6"></a>`): '
                     + '; '.join(wrong))


def test_page_internal_references_resolve(page):
  text = DOC.read_text(encoding='utf-8')
  bad = sorted({f'§{n} (line {_line(text, m.start())})' for m in SECTION_IN.finditer(text)
                for n in [m.group(1)] if not page.has_section(n)})
  assert not bad, f'docs/method.md refers to sections it does not have: {bad}'


def find_bad_references(page: Page, files) -> List[str]:
  """Every `method.md §X / Dn / #anchor` reference in `files` that the page cannot resolve."""
  bad = []
  for path, text in files:
    if 'method.md' not in text:
      continue
    for m in REF.finditer(text):
      refs = m.group(1)
      for n in SECTION_IN.findall(refs):
        if not page.has_section(n):
          bad.append(f'{_rel(path)}:{_line(text, m.start())}: §{n} is not a section of '
                     'docs/method.md')
      for d in DECISION_IN.findall(refs):
        if not page.has_decision(d):
          bad.append(f'{_rel(path)}:{_line(text, m.start())}: {d} is not a decision of '
                     'docs/method.md')
    for m in LINK.finditer(text):
      if m.group(1) not in page.anchors:
        bad.append(f'{_rel(path)}:{_line(text, m.start())}: #{m.group(1)} is not an anchor of '
                   'docs/method.md (sections are #s<number> with dots as dashes, decisions #d<n>)')
  return bad


def test_references_to_method_page_resolve(page, files):
  bad = find_bad_references(page, files)
  assert not bad, 'dangling references to docs/method.md:\n' + '\n'.join(bad)


def test_reference_scanner_catches_bad_references(page):
  """The scanner itself: good forms pass, a wrong number / decision / anchor is reported."""
  good = ('see docs/method.md §7.1.', '(docs/method.md §6-§7)', 'docs/method.md §5, §7.3, D1, D2',
          'docs/method.md D6', '[x](docs/method.md#s11-3)', 'method.md §10 step 4',
          'docs/method.md\n  §3.2 step 1')
  fake = pathlib.Path('fake.txt')
  assert not find_bad_references(page, [(fake, t) for t in good])
  # Written with a placeholder so that this file, which is scanned too, holds no bad reference.
  for text in ('docs/PAGE §42.7', 'docs/PAGE §6-§99', 'docs/PAGE §5, D13', 'docs/PAGE#s7-9',
               'PAGE §7.1, §7.8'):
    text = text.replace('PAGE', 'method.md')
    assert len(find_bad_references(page, [(fake, text)])) == 1, text


def test_no_citations_of_the_unshipped_working_note(files):
  hits = []
  for path, text in files:
    for m in LEGACY.finditer(text):
      start = text.rfind('\n', 0, m.start()) + 1
      end = text.find('\n', m.end())
      line = text[start:end if end >= 0 else len(text)].strip()
      hits.append(f'{_rel(path)}:{_line(text, m.start())}: {line[:100]}')
  assert not hits, (f'{len(hits)} citations of the working note {NOTE_NAME}, which is not shipped; cite '
                    'docs/method.md instead:\n' + '\n'.join(hits))


def _testing_table() -> Dict[str, List[str]]:
  """docs/testing.md's module table: {module path below didi_jax/: [test files]}."""
  text = (ROOT / 'docs' / 'testing.md').read_text(encoding='utf-8')
  section = text.split("## Where each module's tests are", 1)[1]
  table: Dict[str, List[str]] = {}
  for line in section.splitlines():
    cells = line.split('|')
    if len(cells) < 4 or not cells[1].strip().startswith('`'):
      continue
    tests = re.findall(r'`(test_\w+\.py)`', cells[2])
    prefix = ''
    for name in re.findall(r'`([^`]+)`', cells[1]):
      if '/' in name:
        prefix = name.rsplit('/', 1)[0] + '/'
      else:
        name = prefix + name
      table[name] = tests
  return table


def test_every_module_has_its_tests_listed():
  table = _testing_table()
  modules = sorted(str(p.relative_to(ROOT / 'didi_jax'))
                   for p in (ROOT / 'didi_jax').rglob('*.py')
                   if p.name != '__init__.py' or p.parent.name in ('models', 'sampling'))
  modules.append('__init__.py')
  globbed = {k[:-1] for k in table if k.endswith('*')}
  missing = [m for m in modules
             if m not in table and not any(m.startswith(g) for g in globbed)]
  assert not missing, f'docs/testing.md lists no tests for {missing}'
  for module, tests in table.items():
    assert tests, module
    for t in tests:
      assert (ROOT / 'tests' / t).is_file(), f'{module}: tests/{t} does not exist'
