"""The bundled code task ``code_offline``: small function-synthesis problems (HumanEval format).

Imported by ``make_offline_data.py`` (which writes the files); the project's own content,
CC0 1.0. Each problem is a signature, a description, a reference body, fixed test inputs plus
seeded random ones, and a timing input. Docstring examples and every expected value are
computed by running the reference, so they cannot disagree with it. ``slow`` is a correct but
asymptotically slower body (O(n^2) where the reference is O(n), …): the generator checks that
it passes the tests, and the heavy timing inputs are sized so that it is at least 10x slower.
"""

from __future__ import annotations

import copy
import random
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

Args = tuple


@dataclass
class Problem:
    name: str
    signature: str               # "def f(xs: list[int]) -> int:"
    doc: str                     # the description (one or more lines)
    solution: str                # the reference body (no indentation)
    examples: list[Args]         # shown in the docstring with their outputs
    cases: list[Args]            # more fixed test inputs
    random_cases: Callable[[random.Random], list[Args]] | None = None
    timing: tuple[str, str] = ("", "")  # (untimed setup, timed statement)
    slow: str | None = None      # a correct, asymptotically slower body
    heavy: bool = False          # the timing input separates the complexity classes
    imports: str = ""            # lines before the def (e.g. "from collections import Counter")


def _ints(r: random.Random, n: int, lo: int = -50, hi: int = 50) -> list[int]:
    return [r.randint(lo, hi) for _ in range(n)]


def _missing_cases(r: random.Random) -> list[Args]:
    out = []
    for _ in range(4):
        n = r.randint(1, 9)
        gone = r.randint(0, n)
        xs = [x for x in range(n + 1) if x != gone]
        r.shuffle(xs)
        out.append((xs,))
    return out


def _word(r: random.Random, alphabet: str = "abcde", lo: int = 1, hi: int = 8) -> str:
    return "".join(r.choice(alphabet) for _ in range(r.randint(lo, hi)))


P = Problem
PROBLEMS: list[Problem] = [
    P("add", "def add(a: int, b: int) -> int:", "Return the sum of a and b.",
      "return a + b", [(2, 3)], [(0, 0), (-4, 4), (10**12, 1)],
      lambda r: [(r.randint(-999, 999), r.randint(-999, 999)) for _ in range(4)],
      ("", "add(123456789, 987654321)")),
    P("sum_list", "def sum_list(xs: list[int]) -> int:",
      "Return the sum of the integers in xs (0 for an empty list).",
      "return sum(xs)", [([1, 2, 3],), ([],)], [([-5, 5, 10],), ([7],)],
      lambda r: [(_ints(r, r.randint(0, 12)),) for _ in range(4)],
      ("data = list(range(100_000))", "sum_list(data)")),
    P("max_of_list", "def max_of_list(xs: list[int]) -> int:",
      "Return the largest integer in the non-empty list xs.",
      "return max(xs)", [([3, 9, 2],)], [([-3, -9, -2],), ([5],), ([1, 1, 1],)],
      lambda r: [(_ints(r, r.randint(1, 12)),) for _ in range(4)],
      ("data = list(range(100_000))", "max_of_list(data)")),
    P("count_vowels", "def count_vowels(s: str) -> int:",
      "Return how many characters of s are vowels (a, e, i, o, u; upper or lower case).",
      "return sum(1 for c in s.lower() if c in 'aeiou')", [("hello",), ("AEIOU xyz",)],
      [("",), ("rhythm",), ("Programming Language",)],
      lambda r: [(_word(r, "abeiouxyzAE ", 0, 15),) for _ in range(4)],
      ("text = 'the quick brown fox jumps over the lazy dog ' * 2000", "count_vowels(text)")),
    P("reverse_string", "def reverse_string(s: str) -> str:", "Return s reversed.",
      "return s[::-1]", [("abc",)], [("",), ("racecar",), ("Hello, World!",)],
      lambda r: [(_word(r, "abcxyz ", 0, 12),) for _ in range(4)],
      ("text = 'abcdefghij' * 10_000", "reverse_string(text)")),
    P("is_palindrome", "def is_palindrome(s: str) -> bool:",
      "Return True if s reads the same backwards as forwards (case and every character count).",
      "return s == s[::-1]", [("level",), ("hello",)], [("",), ("a",), ("Aa",), ("abba",)],
      lambda r: [((w := _word(r, "ab", 1, 5)) + w[::-1],) for _ in range(3)],
      ("text = 'ab' * 50_000 + 'ba' * 50_000", "is_palindrome(text)")),
    P("factorial", "def factorial(n: int) -> int:", "Return n! for n >= 0 (0! is 1).",
      "result = 1\nfor i in range(2, n + 1):\n    result *= i\nreturn result",
      [(5,), (0,)], [(1,), (10,), (20,)], None, ("", "factorial(300)")),
    P("fibonacci", "def fibonacci(n: int) -> int:",
      "Return the n-th Fibonacci number: fibonacci(0) == 0, fibonacci(1) == 1, and each next one\n"
      "is the sum of the two before it.",
      "a, b = 0, 1\nfor _ in range(n):\n    a, b = b, a + b\nreturn a",
      [(0,), (10,)], [(1,), (2,), (20,), (30,)], None, ("", "fibonacci(24)"),
      slow="if n < 2:\n    return n\nreturn fibonacci(n - 1) + fibonacci(n - 2)", heavy=True),
    P("is_even", "def is_even(n: int) -> bool:", "Return True if the integer n is even.",
      "return n % 2 == 0", [(4,), (7,)], [(0,), (-3,), (-8,)], None, ("", "is_even(10**30)")),
    P("square_all", "def square_all(xs: list[int]) -> list[int]:",
      "Return a new list with the square of every element of xs, in order.",
      "return [x * x for x in xs]", [([1, 2, 3],)], [([],), ([-4, 0, 4],)],
      lambda r: [(_ints(r, r.randint(0, 8)),) for _ in range(3)],
      ("data = list(range(50_000))", "square_all(data)")),
    P("filter_positive", "def filter_positive(xs: list[int]) -> list[int]:",
      "Return the elements of xs that are greater than zero, in their original order.",
      "return [x for x in xs if x > 0]", [([-1, 2, 0, 5],)], [([],), ([-3, -2],)],
      lambda r: [(_ints(r, r.randint(0, 10)),) for _ in range(3)],
      ("data = list(range(-25_000, 25_000))", "filter_positive(data)")),
    P("count_words", "def count_words(s: str) -> int:",
      "Return the number of words in s, where words are separated by runs of whitespace.",
      "return len(s.split())", [("hello world",), ("  many   spaces here ",)], [("",), ("one",)],
      None, ("text = 'lorem ipsum dolor sit amet ' * 5000", "count_words(text)")),
    P("gcd", "def gcd(a: int, b: int) -> int:",
      "Return the greatest common divisor of the non-negative integers a and b (gcd(0, 0) == 0).",
      "while b:\n    a, b = b, a % b\nreturn a", [(12, 18), (7, 5)], [(0, 0), (0, 9), (100, 75)],
      lambda r: [(r.randint(0, 500), r.randint(0, 500)) for _ in range(4)],
      ("", "gcd(2**60 * 3**20, 2**40 * 3**30)")),
    P("is_prime", "def is_prime(n: int) -> bool:",
      "Return True if n is a prime number (n may be any integer; 0, 1 and negatives are not\n"
      "prime).",
      "if n < 2:\n    return False\ni = 2\nwhile i * i <= n:\n    if n % i == 0:\n"
      "        return False\n    i += 1\nreturn True",
      [(7,), (10,)], [(0,), (1,), (2,), (-7,), (97,), (7919,), (7917,)],
      lambda r: [(r.randint(0, 2000),) for _ in range(5)], ("", "is_prime(1_000_003)"),
      slow="if n < 2:\n    return False\nfor i in range(2, n):\n    if n % i == 0:\n"
           "        return False\nreturn True", heavy=True),
    P("digit_sum", "def digit_sum(n: int) -> int:",
      "Return the sum of the decimal digits of the non-negative integer n.",
      "return sum(int(d) for d in str(n))", [(123,), (0,)], [(9,), (1000,), (987654321,)], None,
      ("", "digit_sum(7 ** 5000)")),
    P("capitalize_words", "def capitalize_words(s: str) -> str:",
      "Return s with the first letter of every space-separated word in upper case and the rest\n"
      "unchanged. Spaces are kept as they are.",
      "return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))",
      [("hello world",), ("a  b",)], [("",), ("already Upper",), ("x",)], None,
      ("text = 'word ' * 20_000", "capitalize_words(text)")),
    P("remove_duplicates", "def remove_duplicates(xs: list[int]) -> list[int]:",
      "Return xs without repeated values, keeping the first occurrence of each in its original\n"
      "order.",
      "seen = set()\nout = []\nfor x in xs:\n    if x not in seen:\n        seen.add(x)\n"
      "        out.append(x)\nreturn out",
      [([3, 1, 3, 2, 1],)], [([],), ([5, 5, 5],)],
      lambda r: [(_ints(r, r.randint(0, 15), 0, 6),) for _ in range(4)],
      ("data = list(range(3000))", "remove_duplicates(data)"),
      slow="out = []\nfor x in xs:\n    if x not in out:\n        out.append(x)\nreturn out",
      heavy=True),
    P("has_duplicates", "def has_duplicates(xs: list[int]) -> bool:",
      "Return True if some value occurs more than once in xs.",
      "return len(set(xs)) != len(xs)", [([1, 2, 3],), ([1, 2, 1],)], [([],), ([4, 4],)],
      lambda r: [(_ints(r, r.randint(0, 8), 0, 20),) for _ in range(4)],
      ("data = list(range(1500))", "has_duplicates(data)"),
      slow="for i in range(len(xs)):\n    for j in range(i + 1, len(xs)):\n"
           "        if xs[i] == xs[j]:\n            return True\nreturn False", heavy=True),
    P("two_sum_exists", "def two_sum_exists(xs: list[int], target: int) -> bool:",
      "Return True if two elements of xs at different positions add up to target.",
      "seen = set()\nfor x in xs:\n    if target - x in seen:\n        return True\n"
      "    seen.add(x)\nreturn False",
      [([2, 7, 11, 15], 9), ([1, 2], 4)], [([], 0), ([3], 6), ([3, 3], 6), ([-1, 5, 4], 3)],
      lambda r: [(_ints(r, r.randint(0, 8), -10, 10), r.randint(-10, 10)) for _ in range(5)],
      ("data = list(range(0, 4000, 2))", "two_sum_exists(data, -1)"),
      slow="for i in range(len(xs)):\n    for j in range(i + 1, len(xs)):\n"
           "        if xs[i] + xs[j] == target:\n            return True\nreturn False",
      heavy=True),
    P("running_sum", "def running_sum(xs: list[int]) -> list[int]:",
      "Return the running totals of xs: element i is xs[0] + … + xs[i].",
      "out = []\ntotal = 0\nfor x in xs:\n    total += x\n    out.append(total)\nreturn out",
      [([1, 2, 3, 4],)], [([],), ([5],), ([-1, 1, -1],)],
      lambda r: [(_ints(r, r.randint(0, 10)),) for _ in range(3)],
      ("data = list(range(3000))", "running_sum(data)"),
      slow="return [sum(xs[:i + 1]) for i in range(len(xs))]", heavy=True),
    P("count_occurrences", "def count_occurrences(xs: list[int], x: int) -> int:",
      "Return how many times x occurs in xs.",
      "return xs.count(x)", [([1, 2, 1, 1], 1)], [([], 3), ([2, 2], 3)],
      lambda r: [(_ints(r, r.randint(0, 10), 0, 3), r.randint(0, 3)) for _ in range(3)],
      ("data = [i % 7 for i in range(100_000)]", "count_occurrences(data, 3)")),
    P("most_frequent", "def most_frequent(xs: list[int]) -> int:",
      "Return the value that occurs most often in the non-empty list xs; on a tie, the one\n"
      "whose first occurrence comes first.",
      "counts = {}\nfor x in xs:\n    counts[x] = counts.get(x, 0) + 1\nbest = max(counts.values())\n"
      "for x in xs:\n    if counts[x] == best:\n        return x",
      [([1, 3, 3, 2, 1, 3],), ([4, 5, 5, 4],)], [([7],), ([2, 1],)],
      lambda r: [(_ints(r, r.randint(1, 12), 0, 4),) for _ in range(4)],
      ("data = list(range(2000)) + [1999]", "most_frequent(data)"),
      slow="best, best_count = xs[0], 0\nfor x in xs:\n    c = xs.count(x)\n"
           "    if c > best_count:\n        best, best_count = x, c\nreturn best", heavy=True),
    P("first_unique_char", "def first_unique_char(s: str) -> int:",
      "Return the index of the first character of s that occurs exactly once in s, or -1 if\n"
      "there is none.",
      "counts = {}\nfor c in s:\n    counts[c] = counts.get(c, 0) + 1\nfor i, c in enumerate(s):\n"
      "    if counts[c] == 1:\n        return i\nreturn -1",
      [("leetcode",), ("aabb",)], [("",), ("z",), ("aabbc",)],
      lambda r: [(_word(r, "abcd", 0, 9),) for _ in range(4)],
      ("text = 'ab' * 1500 + 'c'", "first_unique_char(text)"),
      slow="for i, c in enumerate(s):\n    if s.count(c) == 1:\n        return i\nreturn -1",
      heavy=True),
    P("max_subarray_sum", "def max_subarray_sum(xs: list[int]) -> int:",
      "Return the largest sum of a non-empty contiguous slice of the non-empty list xs.",
      "best = cur = xs[0]\nfor x in xs[1:]:\n    cur = max(x, cur + x)\n    best = max(best, cur)\n"
      "return best",
      [([-2, 1, -3, 4, -1, 2, 1, -5, 4],), ([-3, -1, -2],)], [([5],), ([1, 2, 3],)],
      lambda r: [(_ints(r, r.randint(1, 12), -9, 9),) for _ in range(4)],
      ("data = [(-1) ** i * (i % 17) for i in range(1500)]", "max_subarray_sum(data)"),
      slow="best = xs[0]\nfor i in range(len(xs)):\n    total = 0\n    for j in range(i, len(xs)):\n"
           "        total += xs[j]\n        best = max(best, total)\nreturn best", heavy=True),
    P("longest_unique_substring", "def longest_unique_substring(s: str) -> int:",
      "Return the length of the longest substring of s without repeated characters.",
      "last = {}\nstart = best = 0\nfor i, c in enumerate(s):\n    if last.get(c, -1) >= start:\n"
      "        start = last[c] + 1\n    last[c] = i\n    best = max(best, i - start + 1)\n"
      "return best",
      [("abcabcbb",), ("bbbb",)], [("",), ("pwwkew",), ("abcdef",)],
      lambda r: [(_word(r, "abcde", 0, 12),) for _ in range(4)],
      ("text = ''.join(chr(0x4E00 + i) for i in range(1500))", "longest_unique_substring(text)"),
      slow="best = 0\nfor i in range(len(s)):\n    seen = set()\n    for j in range(i, len(s)):\n"
           "        if s[j] in seen:\n            break\n        seen.add(s[j])\n"
           "        best = max(best, j - i + 1)\nreturn best", heavy=True),
    P("intersection", "def intersection(a: list[int], b: list[int]) -> list[int]:",
      "Return the values that occur in both a and b, without duplicates, in increasing order.",
      "return sorted(set(a) & set(b))", [([1, 2, 2, 3], [2, 3, 4])], [([], [1]), ([5, 1], [1, 5])],
      lambda r: [(_ints(r, r.randint(0, 8), 0, 9), _ints(r, r.randint(0, 8), 0, 9))
                 for _ in range(4)],
      ("a = list(range(0, 4000, 2))\nb = list(range(0, 4000, 3))", "intersection(a, b)"),
      slow="out = []\nfor x in a:\n    if x in b and x not in out:\n        out.append(x)\n"
           "return sorted(out)", heavy=True),
    P("is_anagram", "def is_anagram(a: str, b: str) -> bool:",
      "Return True if b is a rearrangement of the characters of a (case-sensitive).",
      "return sorted(a) == sorted(b)", [("listen", "silent"), ("abc", "abd")],
      [("", ""), ("a", "aa"), ("Ab", "ba")], None,
      ("a = 'abcdefghij' * 2000\nb = a[::-1]", "is_anagram(a, b)")),
    P("rotate_list", "def rotate_list(xs: list[int], k: int) -> list[int]:",
      "Return xs rotated k places to the right (k >= 0 may exceed the length; [] stays []).",
      "if not xs:\n    return []\nk %= len(xs)\nreturn xs[-k:] + xs[:-k] if k else list(xs)",
      [([1, 2, 3, 4, 5], 2)], [([], 3), ([1, 2], 0), ([1, 2, 3], 4)],
      lambda r: [(_ints(r, r.randint(0, 6)), r.randint(0, 9)) for _ in range(3)],
      ("data = list(range(100_000))", "rotate_list(data, 12_345)")),
    P("flatten", "def flatten(rows: list[list[int]]) -> list[int]:",
      "Return the elements of the lists in rows, one list after the other, as one flat list.",
      "return [x for row in rows for x in row]", [([[1, 2], [3], []],)], [([],), ([[], []],)],
      None, ("rows = [list(range(10)) for _ in range(5000)]", "flatten(rows)"),
      slow="out = []\nfor row in rows:\n    out = out + row\nreturn out", heavy=True),
    P("chunk", "def chunk(xs: list[int], size: int) -> list[list[int]]:",
      "Split xs into consecutive pieces of length size (size >= 1); the last may be shorter.",
      "return [xs[i:i + size] for i in range(0, len(xs), size)]", [([1, 2, 3, 4, 5], 2)],
      [([], 3), ([1, 2, 3], 3), ([1], 5)], None,
      ("data = list(range(100_000))", "chunk(data, 7)")),
    P("merge_sorted", "def merge_sorted(a: list[int], b: list[int]) -> list[int]:",
      "Merge the two ascending lists a and b into one ascending list.",
      "out = []\ni = j = 0\nwhile i < len(a) and j < len(b):\n    if a[i] <= b[j]:\n"
      "        out.append(a[i])\n        i += 1\n    else:\n        out.append(b[j])\n"
      "        j += 1\nreturn out + a[i:] + b[j:]",
      [([1, 4, 6], [2, 3, 7])], [([], []), ([1], []), ([], [2, 2])],
      lambda r: [(sorted(_ints(r, r.randint(0, 6))), sorted(_ints(r, r.randint(0, 6))))
                 for _ in range(4)],
      ("a = list(range(0, 40_000, 2))\nb = list(range(1, 40_000, 2))", "merge_sorted(a, b)")),
    P("count_pairs_with_sum", "def count_pairs_with_sum(xs: list[int], target: int) -> int:",
      "Return the number of index pairs i < j with xs[i] + xs[j] == target.",
      "seen = {}\ncount = 0\nfor x in xs:\n    count += seen.get(target - x, 0)\n"
      "    seen[x] = seen.get(x, 0) + 1\nreturn count",
      [([1, 5, 7, -1, 5], 6)], [([], 2), ([1, 1, 1], 2), ([3], 6)],
      lambda r: [(_ints(r, r.randint(0, 10), -5, 5), r.randint(-5, 5)) for _ in range(4)],
      ("data = [i % 100 for i in range(1500)]", "count_pairs_with_sum(data, 99)"),
      slow="count = 0\nfor i in range(len(xs)):\n    for j in range(i + 1, len(xs)):\n"
           "        if xs[i] + xs[j] == target:\n            count += 1\nreturn count", heavy=True),
    P("binary_search", "def binary_search(xs: list[int], x: int) -> int:",
      "Return the index of x in the ascending list xs of distinct values, or -1 if it is absent.",
      "lo, hi = 0, len(xs) - 1\nwhile lo <= hi:\n    mid = (lo + hi) // 2\n    if xs[mid] == x:\n"
      "        return mid\n    if xs[mid] < x:\n        lo = mid + 1\n    else:\n        hi = mid - 1\n"
      "return -1",
      [([1, 3, 5, 7], 5), ([1, 3, 5, 7], 4)], [([], 1), ([2], 2), ([1, 2, 3], 3)],
      lambda r: [(sorted(set(_ints(r, 8, 0, 30))), r.randint(0, 30)) for _ in range(5)],
      ("data = list(range(0, 400_000, 2))", "binary_search(data, 399_998)"),
      slow="for i, v in enumerate(xs):\n    if v == x:\n        return i\nreturn -1", heavy=True),
    P("product_except_self", "def product_except_self(xs: list[int]) -> list[int]:",
      "Return a list whose element i is the product of every element of xs except xs[i].",
      "n = len(xs)\nout = [1] * n\nleft = 1\nfor i in range(n):\n    out[i] = left\n"
      "    left *= xs[i]\nright = 1\nfor i in range(n - 1, -1, -1):\n    out[i] *= right\n"
      "    right *= xs[i]\nreturn out",
      [([1, 2, 3, 4],)], [([],), ([5],), ([2, 0, 3],), ([0, 0],)],
      lambda r: [(_ints(r, r.randint(0, 6), -4, 4),) for _ in range(4)],
      ("data = [1, -1] * 500", "product_except_self(data)"),
      slow="out = []\nfor i in range(len(xs)):\n    p = 1\n    for j, x in enumerate(xs):\n"
           "        if j != i:\n            p *= x\n    out.append(p)\nreturn out", heavy=True),
    P("longest_increasing_run", "def longest_increasing_run(xs: list[int]) -> int:",
      "Return the length of the longest strictly increasing contiguous run in xs (0 if empty).",
      "best = cur = 0\nprev = None\nfor x in xs:\n    cur = cur + 1 if prev is not None and x > prev "
      "else 1\n    best = max(best, cur)\n    prev = x\nreturn best",
      [([1, 2, 2, 3, 4, 1],)], [([],), ([5],), ([3, 2, 1],)],
      lambda r: [(_ints(r, r.randint(0, 10), 0, 5),) for _ in range(4)],
      ("data = list(range(50_000))", "longest_increasing_run(data)")),
    P("caesar_shift", "def caesar_shift(s: str, k: int) -> str:",
      "Shift every lower-case letter a-z of s by k places in the alphabet (wrapping around);\n"
      "leave every other character unchanged. k may be negative.",
      "return ''.join(chr((ord(c) - 97 + k) % 26 + 97) if 'a' <= c <= 'z' else c for c in s)",
      [("abc xyz", 3)], [("", 5), ("Hello!", 1), ("abc", -1), ("z", 27)], None,
      ("text = 'the quick brown fox ' * 5000", "caesar_shift(text, 13)")),
    P("run_length_encode", "def run_length_encode(s: str) -> str:",
      "Encode s by replacing each run of a repeated character with the character followed by\n"
      "the run's length, e.g. 'aaab' -> 'a3b1'.",
      "out = []\ni = 0\nwhile i < len(s):\n    j = i\n    while j < len(s) and s[j] == s[i]:\n"
      "        j += 1\n    out.append(f'{s[i]}{j - i}')\n    i = j\nreturn ''.join(out)",
      [("aaabcc",)], [("",), ("a",), ("abab",)],
      lambda r: [(_word(r, "ab", 0, 10),) for _ in range(3)],
      ("text = 'aaaabbbcc' * 5000", "run_length_encode(text)")),
    P("balanced_brackets", "def balanced_brackets(s: str) -> bool:",
      "Return True if the brackets (), [] and {} in s are balanced and properly nested; other\n"
      "characters are ignored.",
      "pairs = {')': '(', ']': '[', '}': '{'}\nstack = []\nfor c in s:\n    if c in '([{':\n"
      "        stack.append(c)\n    elif c in pairs:\n        if not stack or stack.pop() != pairs[c]:\n"
      "            return False\nreturn not stack",
      [("([]{})",), ("(]",)], [("",), ("((",), ("a(b)c",), ("{[()()]}",)],
      lambda r: [(_word(r, "()[]", 0, 8),) for _ in range(4)],
      ("text = '([{}])' * 10_000", "balanced_brackets(text)")),
    P("roman_to_int", "def roman_to_int(s: str) -> int:",
      "Return the value of the Roman numeral s (I, V, X, L, C, D, M; subtractive forms such as\n"
      "IV and CM included).",
      "values = {'I': 1, 'V': 5, 'X': 10, 'L': 50, 'C': 100, 'D': 500, 'M': 1000}\ntotal = 0\n"
      "for i, c in enumerate(s):\n    v = values[c]\n    if i + 1 < len(s) and values[s[i + 1]] > v:\n"
      "        total -= v\n    else:\n        total += v\nreturn total",
      [("XIV",), ("MCMXCIV",)], [("I",), ("IV",), ("MMXXIV",), ("CDXLIV",)], None,
      ("", "roman_to_int('MMMDCCCLXXXVIII')")),
    P("to_binary", "def to_binary(n: int) -> str:",
      "Return the binary representation of the non-negative integer n without a prefix.",
      "return bin(n)[2:]", [(5,), (0,)], [(1,), (2,), (255,), (1024,)], None,
      ("", "to_binary(2 ** 4000 - 1)")),
    P("transpose", "def transpose(m: list[list[int]]) -> list[list[int]]:",
      "Return the transpose of the rectangular matrix m (a list of equal-length rows).",
      "return [list(col) for col in zip(*m)]", [([[1, 2, 3], [4, 5, 6]],)], [([[7]],), ([[1], [2]],)],
      None, ("m = [list(range(200)) for _ in range(200)]", "transpose(m)")),
    P("second_largest", "def second_largest(xs: list[int]) -> int:",
      "Return the second largest distinct value of xs (xs has at least two distinct values).",
      "return sorted(set(xs))[-2]", [([3, 1, 4, 4],), ([10, 20],)], [([5, 5, 6],), ([-1, -2, -3],)],
      lambda r: [(_ints(r, r.randint(2, 10), 0, 3) + [4],) for _ in range(4)],
      ("data = list(range(100_000))", "second_largest(data)")),
    P("missing_number", "def missing_number(xs: list[int]) -> int:",
      "xs holds every integer from 0 to len(xs) except one, in any order. Return the missing one.",
      "n = len(xs)\nreturn n * (n + 1) // 2 - sum(xs)", [([3, 0, 1],), ([0],)], [([1],), ([2, 0, 1],)],
      _missing_cases,
      ("data = list(range(3000))", "missing_number(data)"),
      slow="for i in range(len(xs) + 1):\n    if i not in xs:\n        return i", heavy=True),
    P("words_longer_than", "def words_longer_than(s: str, n: int) -> list[str]:",
      "Return the space-separated words of s that have more than n characters, in order.",
      "return [w for w in s.split() if len(w) > n]", [("the quick brown fox", 3)],
      [("", 0), ("a bb ccc", 5), ("a bb ccc", 0)], None,
      ("text = 'a bb ccc dddd eeeee ' * 5000", "words_longer_than(text, 2)")),
    P("common_prefix", "def common_prefix(words: list[str]) -> str:",
      "Return the longest string that every word in words starts with ('' for no words).",
      "if not words:\n    return ''\nprefix = words[0]\nfor w in words[1:]:\n"
      "    while not w.startswith(prefix):\n        prefix = prefix[:-1]\nreturn prefix",
      [(["flower", "flow", "flight"],), (["dog", "car"],)], [([],), (["same"],), (["ab", "abc"],)],
      None, ("words = ['prefix' * 50 + str(i) for i in range(2000)]", "common_prefix(words)")),
    P("matrix_sum", "def matrix_sum(m: list[list[int]]) -> int:",
      "Return the sum of every number in the matrix m (a list of rows; rows may be empty).",
      "return sum(sum(row) for row in m)", [([[1, 2], [3, 4]],)], [([],), ([[]],), ([[-1], [1]],)],
      None, ("m = [list(range(300)) for _ in range(300)]", "matrix_sum(m)")),
    P("pairwise_differences", "def pairwise_differences(xs: list[int]) -> list[int]:",
      "Return the differences between consecutive elements: element i is xs[i + 1] - xs[i].",
      "return [b - a for a, b in zip(xs, xs[1:])]", [([1, 4, 9, 16],)], [([],), ([3],), ([5, 2],)],
      lambda r: [(_ints(r, r.randint(0, 8)),) for _ in range(3)],
      ("data = list(range(100_000))", "pairwise_differences(data)")),
]


# ----------------------------------------------------------------------------- rendering

def _body(code: str) -> str:
    return textwrap.indent(code.rstrip("\n"), "    ") + "\n"


def _load(prompt: str, body: str, name: str):
    ns: dict = {}
    exec(prompt + _body(body), ns)  # noqa: S102 - the project's own reference code
    return ns[name]


def prompt_of(p: Problem) -> str:
    ref = _load(p.imports + p.signature + "\n", p.solution, p.name)
    lines = [p.signature, '    """' + p.doc.splitlines()[0]]
    lines += ["    " + line for line in p.doc.splitlines()[1:]]
    for args in p.examples:
        call = f"{p.name}({', '.join(map(repr, args))})"
        lines += [f"    >>> {call}", f"    {ref(*copy.deepcopy(args))!r}"]
    lines.append('    """')
    return p.imports + "\n".join(lines) + "\n"


def test_of(p: Problem, r: random.Random) -> str:
    ref = _load(p.imports + p.signature + "\n", p.solution, p.name)
    cases = list(p.examples) + list(p.cases) + (p.random_cases(r) if p.random_cases else [])
    lines = ["def check(candidate):"]
    seen = set()
    for args in cases:
        text = ", ".join(map(repr, args))
        if text in seen:
            continue
        seen.add(text)
        lines.append(f"    assert candidate({text}) == {ref(*copy.deepcopy(args))!r}")
    return "\n".join(lines) + "\n"


def documents(rng: Callable[[str], random.Random]) -> list[dict]:
    """The task's documents (HumanEval fields plus timing_setup, timing_stmt, heavy, slow)."""
    docs = []
    names = [p.name for p in PROBLEMS]
    assert len(set(names)) == len(names), "problem names must be unique"
    for i, p in enumerate(PROBLEMS):
        prompt = prompt_of(p)
        test = test_of(p, rng(f"code/{p.name}"))
        docs.append({
            "task_id": f"code_offline/{i}", "entry_point": p.name, "prompt": prompt,
            "canonical_solution": _body(p.solution), "test": test,
            "timing_setup": p.timing[0], "timing_stmt": p.timing[1], "heavy": p.heavy,
            "slow_solution": _body(p.slow) if p.slow else None,
        })
    for d in docs:  # the generator's own checks: reference and slow bodies pass the tests
        for body in (d["canonical_solution"], d["slow_solution"]):
            if body is not None:
                ns: dict = {}
                exec(d["prompt"] + body + "\n" + d["test"] + f"\ncheck({d['entry_point']})\n", ns)  # noqa: S102
    return docs
