"""Cleaning: per-text quality signals (kernels/text_stats.py) as columns, and the rules that reject rows on them.

Columns added (response signals unprefixed, the prompt's with ``prompt_``; see kernels/text_stats.py for the exact
definitions): ``n_words``, ``mean_word_len``, ``frac_letters``, ``frac_digits``, ``frac_punct``, ``frac_space``,
``frac_non_ascii``, ``frac_alpha_words``, ``n_lines``, ``max_line_len``, ``frac_dup_line``, ``frac_dup_line_chars``,
``top_{2,3,4}gram_frac``, ``dup_{5..10}gram_frac``, ``symbol_word_ratio``, ``frac_bullet_lines``,
``frac_ellipsis_lines``, ``n_urls``, ``n_code_fences``, ``script`` (dominant script's name), ``frac_script``.
Characters are counted by engine/stages/rules.py already (``prompt_chars``, ``response_chars``), so not again here.

Verdicts, checked in this order on rows still ``kept`` (``detail`` = the measured value and the bound, prefixed
``prompt.`` when the prompt was judged):

- ``no_content``: the text holds no letter, number or symbol (emoji and math signs count): only punctuation,
  whitespace or invisible characters ("...", "!!!", "\u200b"). Empty texts are engine/stages/rules.py's.
- ``placeholder``: the whole text is a placeholder ("N/A", "TBD", "...", "<no output>", "暂无", "test test",
  "testing 1 2 3", "asdf", "foo bar", "blah blah", "dummy text", "<melody goes here>", "测试"), it starts with an
  upper-case "TODO:" / "FIXME:" (a Spanish "Todo me parece bonito" passes), or it contains an Alpaca
  ``<noinput>`` / ``<nooutput>`` token or "lorem ipsum" (C4 drops pages with "lorem ipsum"). A lone "test" is not
  one: 'Write "Test"' is answered "Test".
- ``repeated_words``: the whole text is one word, or a unit of up to ``repeated_max_unit_words`` words, repeated
  ``repeated_min_repeats``+ times ("Checking Checking Checking ...", "buy now buy now buy now"; punctuation at the
  ends of words and ASCII case ignored), and the unit holds a letter ("0 0 0", "😂 😂 😂" pass). Two repeats pass:
  "Bora Bora", "New York, New York", "谢谢".
- ``random_letters``: the text's Latin words (ASCII letters only; hashtags, mentions, acronyms, words with digits,
  underscores or accents skipped: kernels/text_stats.py ``junk_stats``) make up at least half of its non-space
  characters, and their letter bigrams score below -1.5 on average with at least 2 rare ones. The score of a bigram
  is log2 of its frequency in English SFT text against uniformly random letters (0 = as often as chance; "th"
  +4, "qx" -8), with the digraphs of Polish, Czech, Hungarian, Nordic, Welsh, pinyin and other Latin orthographies
  raised to 0: random letters average -3.1, English +1.5, German +1.4, Spanish +1.4, French +1.3, pinyin +0.4,
  Polish 0.0.
  Chinese, Japanese, Cyrillic, code and math are not judged (no Latin words, or too few).
- ``refusal``: boilerplate refusals ("As an AI language model", "I'm sorry, but I cannot ...", "This instruction
  cannot be completed by a GPT model", "作为一个AI语言模型", "抱歉，我无法 ..."). Openings that only look alike
  ("I can't believe ...", "I'm sorry that you're not happy with your purchase" in a customer-service reply) pass:
  a refusal needs a refusing verb (cannot/unable + provide/answer/complete/...) or the AI self-description.
- ``repeats_prompt``: the response contains the whole prompt (ASCII case and whitespace runs ignored), the prompt
  has 5+ words and makes up at least half of the response's characters: the model echoed its input and added
  little. An answer that restates the question and then answers it passes (plain containment flagged 15
  alpaca_52k rows, most of them such answers), and so does one that repeats only the *input* part (edit tasks
  that leave a sentence unchanged). Exact equality is engine/stages/rules.py's ``response_equals_prompt``.
- ``truncated``: an unclosed ```` ``` ```` block; a last character that cannot end a text ("(", "[", "{", "–",
  "、"); in responses of 8+ words a last word that cannot end an English sentence ("and", "the", "of",
  "because", ...); in responses of 20+ words a "," closing a line of 5+ words (a letter's "Sincerely," passes), a
  "，" closing a line of 10+ characters (likewise "最好的，"; "此外，" is the answer to "give a connective"), or
  a word cut by an ellipsis at the end of a 10+ word line ("... but Charles and..."; t0_train_50k has 655 such
  source-truncated passages). Short answers are not judged by the word tests: "She by the" is the right answer
  to "delete every word starting with s", "A" to a multiple-choice question.
- ``script_mismatch``: prompt and response each have 20+ letters, their dominant scripts differ, the response's
  is not Latin, the prompt holds at most 1 letter of the response's script and the response under 50% of the
  prompt's (an English prompt answered in Chinese, a Russian one in Arabic). A response in Latin script is never a
  mismatch: code, SQL, HTML, product and person names are Latin whatever the prompt's language (alpaca_chinese
  has 175 Chinese prompts answered with code or with English names that would otherwise fail). Prompts asking
  for a translation or naming another language are exempt (``translation_regex``).
- ``gopher_repetition``: the Gopher repetition table (duplicate lines, most frequent 2/3/4-gram, duplicated
  5..10-grams), on texts of ``repetition_min_words``+ words.
- ``gopher_quality``: the Gopher quality filter (word count, mean word length, symbol-to-word ratio, bullet and
  ellipsis lines, words with a letter), on texts of ``quality_min_words``+ words; the word-length and
  alphabetic-word rules only where the dominant script puts spaces between words.

What each row is judged on: the response, which for ``text`` and ``classification`` rows is the text itself
(engine/io/schema.py; the label never is). Instruction rows (alpaca, chat, sharegpt, mapped) also by the prompt
rules (repeats_prompt, script_mismatch, the prompt's repetition when ``judge_prompt_repetition``), and an
instruction row is exempt from no_content / repeated_words / random_letters when its prompt asks for such a text
(``*_exempt_regex``: Morse code, "repeat it 5 times", a Caesar cipher, a random string, a DNA sequence) or quotes
the whole response. ``refusal`` and ``truncated`` judge model answers, not a tweet or a news sentence, so they skip
classification rows ("I'm sorry, but I cannot stand this movie." is a review). Rows already rejected by an earlier
stage are measured (their signal columns are filled) but keep their verdict.

The short-text junk rules judge texts of every length (the Gopher rules below need 50+ words), with their false
positives measured on the shared datasets (bench/bench_rules_fp.py, bench/RESULTS.md "Issue 9"): together they
reject at most 0.04% of the rows of any of alpaca_52k, alpaca_chinese, code_alpaca_2k, gsm8k, t0_train_50k,
financial_phrasebank, the six TweetEval sets and the evaluation prompt sets, and 97.7% of planted junk of 1..200
words (log-uniform lengths; 99.9% with uniform ones). The misses are short random strings: one random word is caught
about half the time, since one without two rare bigrams reads like a name or an abbreviation ("Kanl", "fr", "pwd").

Why the defaults differ from Gopher's table, measured on alpaca_52k (52,002 rows), with the numbers behind each:
Gopher filtered web pages of 50+ words; SFT answers are short, structured, and often code, lists or tables.
- Word count: Gopher drops pages under 50 words; 62% of alpaca_52k responses and 95% of t0_train_50k's are under
  50 words (the median t0 answer is 2 words: "positive", "B"). A short answer is the right answer to a short-answer
  task, so there is no minimum-word rule; 50 words is instead the size below which the Gopher *quality* fractions
  are not judged at all (a ratio over 5 words is noise).
- Repetition at Gopher's thresholds (with a 50-word gate) rejects 931 alpaca_52k rows (1.8%); a sample of 40 was
  all legitimate: songs with a chorus (dup 5-gram 0.45-0.5), parallel definitions ("A high pressure system is a
  region of relative atmospheric pressure that is higher ... A low pressure system is a region ..." 0.73),
  numbered quizzes. On Chinese text, where a word is one character, 2,175 of 30,559 alpaca_chinese rows exceed the
  5-gram bound. The SFT defaults below reject text that mostly repeats itself (the same list or sentence twice,
  looping lines): 0.5/0.4 for lines, 0.5/0.45/0.4 for the top 2/3/4-gram, 0.80..0.70 for duplicated 5..10-grams.
  ``CleanConfig.gopher()`` restores Gopher's own values for web-like text.
- Quality: Gopher's mean-word-length floor (3), symbol ratio (0.1), bullet (0.9) and alphabetic-word (0.8) rules
  reject 38 + 12 + 367 + 405 alpaca_52k rows of 50+ words that are numeric tables, code, hashtag tweets and
  bullet lists, all valid answers; they are off by default (``-1``) and on in ``CleanConfig.gopher()``. The word
  count cap (100,000) and the ellipsis-line rule (0.3) keep Gopher's values; the mean-word-length ceiling (base64,
  hashes, URL soup) moves from 10 to 15 because HTML answers reach 11.9 (5 alpaca_52k rows over 10, none over 12).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.registry import Option, Range, check_fields, register
from engine.stage import Stage, kept_mask, reject, set_column
from kernels.text_stats import (
    FLOAT_SIGNALS,
    INT_SIGNALS,
    SCRIPT_ID,
    SCRIPTS,
    SPACE_DELIMITED,
    char_tables,
    contains_literals,
    contains_prompt,
    junk_stats,
    text_stats,
)

STR = pa.large_string()

# Whole-text placeholders (case-insensitive, surrounding whitespace and one trailing period ignored). "None", "无"
# and "null" are not here: they are real answers ("What does this function return?" -> "None").
# Issue 9's whole-text placeholders (keyboard and test strings, filler text); "test" alone, "foo" and "xxx" are not
# here either: 'Write "Test"', a program that prints "foo", Roman numeral 30.
PLACEHOLDER_ISSUE9 = (
    r"tbc|wip|fixme|test(?:ing)?(?:[\s,.!]+(?:test(?:ing)?|1[\s,.]*2[\s,.]*3|123|one,? two,? three))+|asdf\w*"
    r"|foo\s*bar(?:\s*baz)?|blah(?:[\s,.]+blah)+|(?:dummy|filler|placeholder|sample) (?:text|answer|response|content)"
    r"|(?:insert|enter|type|put|add|write) (?:your |the )?(?:text|answer|response|content|output) here"
    r"|<[^<>\n]{0,40} here>|(?:text|content|answer|response|output) goes here|测试(?:测试)*|待定|待补充|无内容"
)
# ... and a text that starts with an upper-case TODO / FIXME note
PLACEHOLDER_TODO = r"^\s*(?-i:TODO|FIXME)\s*[:\-]"
PLACEHOLDER_REGEX = (
    r"(?i)^\s*(?:n/?a|n\.a|tbd|todo|tba|\.\.\.|…|-+|_+|\?+|no (?:output|input)|not available"
    r"|<\s*(?:no\s*(?:input|output)|empty|blank|none)\s*>|\[(?:placeholder|insert[^\]]*|your (?:answer|response)"
    r"[^\]]*)\]|placeholder|your (?:answer|response) here|暂无|无输出|无输入|<无输入>|<无输出>|"
    + PLACEHOLDER_ISSUE9
    + r")\.?\s*$|"
    + PLACEHOLDER_TODO
    + r"|<\s*no\s*(?:input|output)\s*>|&lt;\s*no\s*(?:input|output)\s*&gt;|<无输入>|&lt;无输入&gt;|(?i:lorem ipsum)"
)

# Refusal / AI-boilerplate patterns. ^ anchors at the start of the (normalised, trimmed) response.
REFUSAL_REGEX = (
    r"(?i)"
    r"(?:^|[.!?]\s+)as an? (?:ai (?:language model|assistant)|artificial intelligence|(?:large )?language model|ai\b"
    r"|virtual assistant|chatbot)"
    r"|\bi(?:'m| am) (?:just |only )?an? (?:ai\b|artificial intelligence|(?:large )?language model|ai (?:language "
    r"model|assistant)|computer program|virtual assistant)"
    r"|^(?:i'?m sorry|i am sorry|sorry|i apologi[sz]e|unfortunately|regrettably)[,.!]?\s*(?:but\s+)?(?:i|we|this|the"
    r" (?:task|instruction|request|model)|as an)\b[^.\n]{0,60}?\b(?:cannot|can't|can ?not|unable|not able|won't be"
    r" able|am not (?:able|allowed|capable)|do not have|don't have)"
    r"|^i (?:cannot|can't|can not|am unable to|'m unable to|am not able to|'m not able to|won't be able to|do not have"
    r" the ability to|don't have the ability to) (?:provide|answer|complete|fulfil|fulfill|perform|do|help|assist"
    r"|generate|create|draw|produce|write|comply|access|browse|see|view|display|show|process|play|sing|give|make"
    r"|predict|respond|physically)"
    r"|^i (?:do not|don't) have (?:personal (?:opinions|experiences|feelings|preferences|beliefs)|feelings|emotions"
    r"|access to (?:the internet|real-time|current|your))"
    r"|^(?:sorry,?\s*|unfortunately,?\s*)?(?:this|the|that|such an?|your)\s+(?:type of\s+|kind of\s+)?(?:task|"
    r"instruction|request|question|prompt|query)s?\b[^.!?\n]{0,60}?\b(?:cannot|can't|can not|could not|is unable to)"
    r" be (?:completed|fulfilled|done|performed|generated|answered|executed|accomplished)"
    r"|^this (?:task|instruction|request|question) (?:cannot|can't|can not|is not possible|is impossible|requires"
    r" (?:a |an )?(?:visual|physical|human))"
    r"|\b(?:we|i) (?:cannot|can't|can not|am unable to|are unable to) complete this (?:task|instruction|request)"
    r"|作为(?:一个|一名|一款)?(?:ai|人工智能|语言模型)"
    r"|^(?:抱歉|对不起|很抱歉|非常抱歉|不好意思)[，,。!！\s]*(?:我|作为|此|这|该|但)[^。\n]{0,25}?(?:无法|不能|没有办法|做不到)"
    r"|(?:gpt|ai|语言)\s*模型(?:无法|不能)(?:完成|执行|生成|回答|处理)"
    r"|(?:无法|不能)由\s*(?:gpt|ai|语言)\s*模型"
    r"|^我(?:无法|不能)(?:回答|提供|完成|执行|生成|画|绘制|访问|浏览|播放|预测)"
    r"|我无法回答(?:这个|该|您的|你的)?问题"
)

# The end of a truncated response, matched on its last 300 characters.
TRUNCATED_END_REGEX = r"[(\[{–—、（]$"  # an opening bracket or a continuation mark cannot end a text
# an English word that cannot end a sentence
TRUNCATED_WORD_REGEX = r"[A-Za-z] (?:and|or|the|a|an|of|but|because|than|very|my|your|our|their|its)$"
TRUNCATED_LONG_REGEX = (
    r"(?:\S+[ \t]+){4,}\S*,$"  # "," closing a line of 5+ words (a letter's one-line "Sincerely," passes)
    r"|[^\n]{10,}，$"  # "，" closing a line of 10+ characters (Chinese sign-offs "最好的，" and "此外，" pass)
    r"|(?:\S+[ \t]+){9,}\S*\p{L}(?:\.\.\.|…)$"  # a word cut by an ellipsis at the end of a 10+ word line
)

# Prompts that ask for a text the short-text junk rules would reject (instruction rows only; matched on the prompt).
# (and code whose value is "[]" or "{}": 'What does this function return?')
NO_CONTENT_EXEMPT_REGEX = (
    r"(?i)morse|ascii|emoticon|smil|punctuat|symbol|ellipsis|\breturn|\bprint|\bcode\b|program|function|\blist\b"
    r"|\barray|json|regex|regular expression|摩尔斯|摩斯|标点|符号|表情|省略号|代码|程序|函数|返回|列表|数组|正则"
)
REPEATED_EXEMPT_REGEX = r"(?i)repeat|times|twice|thrice|again|echo|chant|重复|遍|次"
RANDOM_EXEMPT_REGEX = (
    r"(?i)random|cipher|caesar|rot-?13|encod|encrypt|decod|decrypt|scrambl|anagram|vowel|consonant|revers|backward"
    r"|alphabet|letters|characters|string|password|username|\bdna\b|\brna\b|protein|amino|sequence|palindrom"
    r"|pronoun|phonetic|spell|abbreviat|acronym|morse|base64|hash|gibberish|nonsense|made-up|invent"
    r"|随机|密码|字母|字符|序列|元音|辅音|加密|解密|编码|倒序|反转|拼写|缩写"
)

TRANSLATION_REGEX = (
    r"(?i)translat|in (?:english|chinese|mandarin|cantonese|french|spanish|german|italian|portuguese|russian"
    r"|japanese|korean|arabic|hindi|hebrew|greek|thai|vietnamese|turkish|polish|dutch|swedish)\b"
    r"|翻译|翻譯|译成|英文|英语|英語|中文|汉语|日语|日文|法语|德语|西班牙语|俄语|韩语|拼音|用.{1,4}(?:语|文)"
)


@dataclass
class CleanConfig:
    enabled: bool = True  # false: add the signal columns only, reject nothing
    prompt_signals: bool = True  # also add the prompt's signals as prompt_* columns (instruction rows)
    # --- short-text junk, judged at any length (module docstring; FP and recall in bench/bench_rules_fp.py) ------
    no_content: bool = True  # verdict no_content: no letter, number or symbol (only punctuation, spaces, invisibles)
    no_content_exempt_regex: str = NO_CONTENT_EXEMPT_REGEX  # prompts asking for Morse code, ":-)", punctuation
    repeated_words: bool = True  # verdict repeated_words: the whole text is a short unit of words repeated
    repeated_max_unit_words: int = 3  # the longest unit looked for, words (1..64)
    # ... repeated at least this many times: 3 rejects "Checking Checking Checking", 2 would reject "Bora Bora"
    repeated_min_repeats: float = 3.0
    repeated_exempt_regex: str = REPEATED_EXEMPT_REGEX  # prompts asking for a repetition ("Repeat it 5 times")
    random_letters: bool = True  # verdict random_letters: letters typed at random
    # mean letter-bigram score (kernels/text_stats.py bigram_scores) below this: random letters average -3.1,
    # English +1.5; -1.5 keeps "Hayy ibn Yaqdhan" (-1.5), "Dzhokhar Tsarnaev" and Polish text. Looser settings
    # (1 rare bigram, or -1.0) catch 25% more one-word random strings but reject "pwd", "fm", "y = mx + b", "Joyful"
    random_max_mean_score: float = -1.5
    random_min_rare_bigrams: int = 2  # and at least this many bigrams scoring -7 or less ("qx", "jz"): one is a name
    # and the judged Latin words hold at least this share of the text's non-space characters (code, math, URLs and
    # tweets of hashtags and mentions have less)
    random_min_latin_share: float = 0.5
    random_exempt_regex: str = RANDOM_EXEMPT_REGEX  # prompts asking for ciphers, random strings, DNA, anagrams
    # --- SFT rules --------------------------------------------------------------------------------------------
    placeholder: bool = True  # verdict placeholder (PLACEHOLDER_REGEX)
    placeholder_regex: str = PLACEHOLDER_REGEX  # RE2 syntax, matched on the judged text
    refusal: bool = True  # verdict refusal (REFUSAL_REGEX)
    refusal_regex: str = REFUSAL_REGEX  # RE2 syntax, matched on the response
    # prompts that ask for a refusal or an apology, or that hold such a phrase the response may reword, are exempt
    # ("Create a response an AI assistant could give when asked to do something it cannot do" -> "I'm sorry, I'm
    # not able to do that."; "Reword this statement: I can't do it." -> "I am not able to do it.")
    refusal_exempt_regex: str = (
        r"(?i)\brefus|\bdeclin|\bapolog|\bsorry\b|\bregret|can't|cannot|can not|\bunable\b|not able|impossible for"
        r"|拒绝|道歉|无法|不能"
    )
    repeats_prompt: bool = True  # verdict repeats_prompt: response contains the whole prompt
    repeats_prompt_min_words: int = 5  # prompts shorter than this (words) never trigger it ("Hello" -> "Hello! ...")
    # ... and the copied prompt must be at least this share of the response's characters: an answer that restates
    # the question and then answers it ("It is impossible to predict the cost of living in the US five years from
    # now. However, ...") is fine; a response that is mostly the prompt is not
    repeats_prompt_min_share: float = 0.5
    truncated: bool = True  # verdict truncated (odd n_code_fences, TRUNCATED_END/WORD/LONG_REGEX)
    # responses shorter than this (words) are not judged by the trailing-function-word test: short edit tasks
    # legitimately end that way ("Delete every word starting with s" -> "She by the")
    truncated_min_words: int = 8
    # responses shorter than this are not judged by the trailing "," and cut-off-ellipsis tests: a one-line poem or
    # sentence fragment asked for by the prompt ends with "," or "..." on purpose
    truncated_long_min_words: int = 20
    script_mismatch: bool = True  # verdict script_mismatch (prompt and response in unrelated scripts)
    script_min_letters: int = 20  # both texts need this many letters before their scripts are compared
    # mismatch only if the prompt has at most this many letters of the response's script: a prompt that writes
    # even a few characters in it ("“Scratch Design Studio Galleries”是什么？": 3 Han among 31 letters) shares it
    script_prompt_max_letters: int = 1
    script_max_shared_response: float = 0.50  # ... and the response < this share of the prompt's script
    translation_regex: str = TRANSLATION_REGEX  # prompts matching this (RE2) may switch script: exempt
    # --- Gopher repetition (Rae et al. 2021, table A1; Gopher's value in each comment) ------------------------
    repetition_min_words: int = 50  # texts with fewer words are not judged (Gopher judged 50-word documents and up)
    # also judge instruction rows' prompts by the repetition rules. Off: prompts that quote their input twice
    # ('Analyze this tweet: "X"\n\nTweet: "X"', 0.82 duplicated 5-grams) are a template habit, not junk.
    judge_prompt_repetition: bool = False
    max_dup_line_frac: float = 0.50  # lines equal to an earlier line / lines (Gopher 0.30)
    max_dup_line_chars_frac: float = 0.40  # characters in those lines / characters (Gopher 0.20)
    # most frequent n-gram, n = 2, 3, 4 (Gopher 0.20, 0.18, 0.16)
    max_top_ngram_frac: list[float] = field(default_factory=lambda: [0.50, 0.45, 0.40])
    # duplicated n-grams, n = 5..10 (Gopher 0.15, 0.14, 0.13, 0.12, 0.11, 0.10)
    max_dup_ngram_frac: list[float] = field(default_factory=lambda: [0.80, 0.78, 0.76, 0.74, 0.72, 0.70])
    # --- Gopher quality filter (Rae et al. 2021, appendix A.1.1); -1 = rule off ----------------------------------
    quality_min_words: int = 50  # texts with fewer words are not judged by the fractions below (Gopher's minimum)
    max_words: int = 100_000  # more words: rejected (Gopher 100,000)
    min_mean_word_len: float = -1.0  # characters (Gopher 3; off: numeric tables and code, see the docstring)
    # characters (Gopher 10; HTML answers reach 11.9 in alpaca_52k, nothing legitimate there exceeds 12)
    max_mean_word_len: float = 15.0
    max_symbol_word_ratio: float = -1.0  # max(#, ellipsis) per word (Gopher 0.1; off: hashtags, Python comments)
    max_bullet_lines_frac: float = -1.0  # lines starting with a bullet (Gopher 0.9; off: list answers)
    max_ellipsis_lines_frac: float = 0.30  # lines ending in "..." or "…" (Gopher 0.3)
    min_alpha_words_frac: float = -1.0  # words with a letter (Gopher 0.8; off: code, math, tables)

    def validate(self) -> None:
        if len(self.max_top_ngram_frac) != 3 or len(self.max_dup_ngram_frac) != 6:
            raise ValueError(
                "clean.max_top_ngram_frac needs 3 values (n = 2, 3, 4) and clean.max_dup_ngram_frac 6 "
                f"(n = 5..10); got {len(self.max_top_ngram_frac)} and {len(self.max_dup_ngram_frac)}"
            )
        frac, off = Range(0, 1, also=(-1,)), Range(0, also=(-1,))  # -1 = rule off
        check_fields(
            self, "clean", repeats_prompt_min_words=Range(0), repeats_prompt_min_share=Range(0, 1),
            truncated_min_words=Range(0), truncated_long_min_words=Range(0), script_min_letters=Range(0),
            script_prompt_max_letters=Range(0), script_max_shared_response=Range(0, 1), repetition_min_words=Range(0),
            max_dup_line_frac=frac, max_dup_line_chars_frac=frac, max_top_ngram_frac=frac, max_dup_ngram_frac=frac,
            quality_min_words=Range(0), max_words=off, min_mean_word_len=off, max_mean_word_len=off,
            max_symbol_word_ratio=off, max_bullet_lines_frac=frac, max_ellipsis_lines_frac=frac,
            min_alpha_words_frac=frac, repeated_max_unit_words=Range(1, 64), repeated_min_repeats=Range(2),
            random_max_mean_score=Range(-8, 4), random_min_rare_bigrams=Range(0), random_min_latin_share=Range(0, 1),
        )  # fmt: skip
        # RE2 (Arrow's regex engine): a bad pattern fails here, not in a worker after the map phase started
        patterns = ("placeholder_regex", "refusal_regex", "refusal_exempt_regex", "translation_regex",
                    "no_content_exempt_regex", "repeated_exempt_regex", "random_exempt_regex")  # fmt: skip
        for name in patterns:
            try:
                pc.match_substring_regex(pa.array([""]), getattr(self, name))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ValueError(f"clean.{name}: not a valid RE2 pattern: {e}") from None

    @classmethod
    def gopher(cls, **overrides) -> CleanConfig:
        """Gopher's own thresholds (for web-like text), SFT rules unchanged."""
        values = {
            "repetition_min_words": 1, "max_dup_line_frac": 0.30, "max_dup_line_chars_frac": 0.20,
            "max_top_ngram_frac": [0.20, 0.18, 0.16], "max_dup_ngram_frac": [0.15, 0.14, 0.13, 0.12, 0.11, 0.10],
            "quality_min_words": 1, "min_mean_word_len": 3.0, "max_mean_word_len": 10.0,
            "max_symbol_word_ratio": 0.1, "max_bullet_lines_frac": 0.9, "min_alpha_words_frac": 0.8,
        }  # fmt: skip
        values.update(overrides)
        return cls(**values)


# Column types: counts as int32, fractions as float32 (4 bytes a value; the decision uses the float64 values).
_INT_COLS = [k for k in INT_SIGNALS if k not in ("n_chars", "script")]
_FLOAT_COLS = list(FLOAT_SIGNALS)
_SCRIPT_NAMES = pa.array(SCRIPTS, STR)
_LATIN = SCRIPT_ID["latin"]
_SPACE_DELIM = np.array(sorted(SPACE_DELIMITED), dtype=np.uint8)

# The default placeholder and refusal patterns are matched in two parts, with the same answer: RE2 gives up on an
# alternative anchored at the start (^...) as soon as it cannot match, but scans the whole text for an unanchored
# one (14 ms per 8,192-row batch of 1 KB texts each, where the anchored ones take 0.5 ms). Every unanchored
# alternative of these two patterns contains one of the literals below (ASCII case ignored), so a row without any
# of them can only match an anchored alternative, and the whole pattern runs only on the rows that hold one
# (kernels/text_stats.py contains_literals: one pass over the bytes for all literals, ~1.4 GB/s). Under RE2's (?i)
# "ſ" (U+017F) also matches s and "K" (U+212A) k: a row holding either is always matched in full.
# A pattern set in the config that is not one of these runs whole on every row, as before.
_CASE_FOLDS = ("\u017f", "\u212a")
_UNANCHORED_LITERALS = {
    # <\s*no\s*(input|output)\s*>, &lt;...&gt;, <无输入>, &lt;无输入&gt;, lorem ipsum
    PLACEHOLDER_REGEX: ("<", "&", "lorem ipsum", *_CASE_FOLDS),
    # (^|[.!?]\s+)as an? ..., \bi('m| am) ..., ... complete this (task|...), 作为..., ...模型..., 我无法回答...
    REFUSAL_REGEX: ("as a", "i'm ", "i am ", "complete this ", "作为", "模型", "我无法回答", *_CASE_FOLDS),
}


def _alternatives(pattern: str) -> tuple[str, list[str]]:
    """(leading flag group, top-level alternatives) of a regex: ``(?i)a|(b|c)|[|]`` -> ``("(?i)", ["a", "(b|c)",
    "[|]"])``. Knows escapes, groups and character classes (a ``]`` first in a class is a literal)."""
    flags = ""
    if pattern.startswith("(?") and pattern[2 : pattern.find(")")].isalpha():
        flags, pattern = pattern[: pattern.find(")") + 1], pattern[pattern.find(")") + 1 :]
    parts, depth, in_class, start, i = [], 0, False, 0, 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 1
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
            i += pattern.startswith("^", i + 1)
            i += pattern.startswith("]", i + 1)
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    parts.append(pattern[start:])
    return flags, parts


def _anchored_part(pattern: str) -> str | None:
    """The flag group and the alternatives of ``pattern`` that start with ``^``, as one pattern (None if none)."""
    flags, alts = _alternatives(pattern)
    anchored = [a for a in alts if a.startswith("^")]
    return flags + "|".join(anchored) if anchored else None


def _regex(arr, pattern: str, rows: np.ndarray) -> np.ndarray:
    """``match_substring_regex`` on the rows where ``rows`` is true, False elsewhere (a few rows: matched alone)."""
    k = int(rows.sum())
    if k == 0:
        return np.zeros(len(rows), dtype=bool)
    if 4 * k > len(rows):
        hit = pc.fill_null(pc.match_substring_regex(arr, pattern), False).to_numpy(zero_copy_only=False)
        return hit & rows
    idx = np.flatnonzero(rows)
    out = np.zeros(len(rows), dtype=bool)
    out[idx] = pc.fill_null(pc.match_substring_regex(arr.take(pa.array(idx)), pattern), False).to_numpy(
        zero_copy_only=False
    )
    return out


def _scatter(values: pa.Array, idx: np.ndarray, n: int) -> pa.Array:
    """An n-row array with ``values[j]`` at row ``idx[j]`` and nulls elsewhere."""
    pos = np.full(n, -1, dtype=np.int64)
    pos[idx] = np.arange(len(idx))
    return pc.take(values, pa.array(pos, mask=pos < 0))


def _detail(prefix: str, name: str, values: np.ndarray, op: str, bound: float, rows: np.ndarray) -> pa.Array:
    """'prefix.name=0.912 > 0.75' on the rows where ``rows`` is true (null elsewhere), built with Arrow compute."""
    idx = np.flatnonzero(rows)
    arr = pa.array(values[idx])
    if pa.types.is_floating(arr.type):
        arr = pc.round(arr, 3)
    text = pc.cast(arr, STR)
    joined = pc.binary_join_element_wise(pa.scalar(f"{prefix}{name}=", STR), text,
                                         pa.scalar(f" {op} {bound:g}", STR), pa.scalar("", STR))  # fmt: skip
    return _scatter(joined, idx, len(rows))


def _join(parts: tuple, rows: np.ndarray) -> pa.Array:
    """A detail string per row where ``rows`` is true (null elsewhere): ``parts`` are strings (the same on every row)
    and n-row numpy arrays (that row's value), joined with Arrow compute."""
    idx = np.flatnonzero(rows)
    pieces = [pa.scalar(p, STR) if isinstance(p, str) else pc.cast(pa.array(p[idx]), STR) for p in parts]
    return _scatter(pc.binary_join_element_wise(*pieces, pa.scalar("", STR)), idx, len(rows))


def _matched(prefix: str, arr: pa.Array, pattern: str, rows: np.ndarray) -> pa.Array:
    """The detail "matched '...'" with the first match of ``pattern`` (RE2), cut to 60 characters, on the rows where
    ``rows`` is true (null elsewhere, and where nothing matches)."""
    idx = np.flatnonzero(rows)
    found = pc.extract_regex(arr.take(pa.array(idx)), f"(?P<m>{pattern})").field("m")
    joined = pc.binary_join_element_wise(pa.scalar(f"{prefix}matched '", STR), pc.utf8_slice_codeunits(found, 0, 60),
                                         pa.scalar("'", STR), pa.scalar("", STR))  # fmt: skip
    return _scatter(joined, idx, len(rows))


class _Rule:
    """Accumulates the first failing sub-test per row of one verdict: its mask and its detail string."""

    def __init__(self, n: int):
        self.mask = np.zeros(n, dtype=bool)
        self.detail = pa.nulls(n, STR)

    def add(self, hit: np.ndarray, detail) -> None:
        """``detail``: a string, an n-row array, or a callable ``rows -> array`` asked only for the new rows."""
        new = hit & ~self.mask
        if not new.any():
            return
        if callable(detail):
            detail = detail(new)
        if isinstance(detail, str):
            detail = pa.scalar(detail, STR)
        self.detail = pc.if_else(pa.array(new), detail, self.detail)
        self.mask |= new


@register(
    name="clean", kind="map", section="clean", config=CleanConfig, order=30,
    # the text signals, and the prompt's as prompt_* (with prompt_signals)
    columns=tuple(p + k for p in ("", "prompt_") for k in [*_INT_COLS, *_FLOAT_COLS, "script"]),
    options=[Option("--no-clean", "enabled", "measure the quality signals but reject nothing by them", type=None,
                    value=False)],
)  # fmt: skip
class CleanStage(Stage):
    """Adds the text signals of ``response`` (and ``prompt``) and rejects rows by the rules in the module docstring."""

    def __init__(self, config: CleanConfig | None = None):
        super().__init__(config or CleanConfig())
        c = self.config
        c.validate()  # a stage built in code gets the same checks as the CLI's
        # True: the straightforward path, which the default one must equal (the tests compare them): every row
        # through the kernel's general path, every pattern whole on every row (and the truncation patterns on every
        # row's last 300 characters).
        self.reference = False
        # Patterns matched in two parts (see _UNANCHORED_LITERALS): pattern -> (its anchored alternatives, the bits
        # of the literals its unanchored ones need).
        literals: list[str] = []
        self._split: dict[str, tuple[str | None, np.uint64]] = {}
        for pattern in dict.fromkeys((c.placeholder_regex, c.refusal_regex)):
            if pattern in _UNANCHORED_LITERALS:
                bits = 0
                for lit in _UNANCHORED_LITERALS[pattern]:
                    if lit not in literals:
                        literals.append(lit)
                    bits |= 1 << literals.index(lit)
                self._split[pattern] = (_anchored_part(pattern), np.uint64(bits))
        self._literals = tuple(lit.encode("utf-8") for lit in literals)
        # The expensive setup, once per worker: the character tables and the compiled kernels (loaded from
        # Numba's cache after the first run on a machine, about 1 s; compiled the first time, about 20 s).
        char_tables()
        text_stats(pa.array(["warm up", ""], STR))
        contains_prompt(pa.array(["warm up"], STR), pa.array(["warm"], STR))
        contains_literals(pa.array(["warm up"], STR), (b"warm",))
        junk_stats(pa.array(["warm up"], STR))

    # ---- signals ----------------------------------------------------------------------------------------------
    def _add_signals(self, batch: pa.RecordBatch, stats: dict, prefix: str) -> pa.RecordBatch:
        for k in _INT_COLS:
            batch = set_column(batch, prefix + k, pa.array(stats[k].astype(np.int32)))
        for k in _FLOAT_COLS:
            batch = set_column(batch, prefix + k, pa.array(stats[k].astype(np.float32)))
        script = pc.take(_SCRIPT_NAMES, pa.array(stats["script"].astype(np.int32)))
        return set_column(batch, prefix + "script", script)

    # ---- rules ------------------------------------------------------------------------------------------------
    def _repetition(self, rule: _Rule, s: dict, judge: np.ndarray, prefix: str) -> None:
        c = self.config
        gate = judge & (s["n_words"] >= c.repetition_min_words)
        tests = [("frac_dup_line", c.max_dup_line_frac), ("frac_dup_line_chars", c.max_dup_line_chars_frac)]
        tests += [(f"top_{n}gram_frac", t) for n, t in zip((2, 3, 4), c.max_top_ngram_frac)]
        tests += [(f"dup_{n}gram_frac", t) for n, t in zip(range(5, 11), c.max_dup_ngram_frac)]
        for name, bound in tests:
            if bound >= 0:
                hit = gate & (s[name] > bound)
                if hit.any():
                    rule.add(hit, functools.partial(_detail, prefix, name, s[name], ">", bound))

    def _quality(self, rule: _Rule, s: dict, judge: np.ndarray, prefix: str) -> None:
        c = self.config
        nw = s["n_words"]
        if c.max_words >= 0:
            hit = judge & (nw > c.max_words)
            if hit.any():
                rule.add(hit, functools.partial(_detail, prefix, "n_words", nw, ">", c.max_words))
        gate = judge & (nw >= c.quality_min_words)
        spaced = gate & np.isin(s["script"], _SPACE_DELIM)
        tests = [
            ("mean_word_len", spaced, "<", c.min_mean_word_len),
            ("mean_word_len", spaced, ">", c.max_mean_word_len),
            ("symbol_word_ratio", gate, ">", c.max_symbol_word_ratio),
            ("frac_bullet_lines", gate, ">", c.max_bullet_lines_frac),
            ("frac_ellipsis_lines", gate, ">", c.max_ellipsis_lines_frac),
            ("frac_alpha_words", spaced, "<", c.min_alpha_words_frac),
        ]
        for name, where, op, bound in tests:
            if bound < 0:
                continue
            v = s[name]
            hit = where & ((v < bound) if op == "<" else (v > bound))
            if hit.any():
                rule.add(hit, functools.partial(_detail, prefix, name, v, op, bound))

    def _search(self, arr, pattern: str, rows: np.ndarray, literals: np.ndarray) -> np.ndarray:
        """``match_substring_regex(arr, pattern)`` on ``rows`` (False elsewhere); for a split pattern its anchored
        alternatives on the rows without any of its literals (``literals``: contains_literals' bits per row)."""
        if self.reference or pattern not in self._split:
            return _regex(arr, pattern, rows)
        anchored, bits = self._split[pattern]
        whole = rows & ((literals & bits) != 0)
        hit = _regex(arr, pattern, whole)
        if anchored is not None:
            hit |= _regex(arr, anchored, rows & ~whole)
        return hit

    def _apply(self, batch: pa.RecordBatch, name: str, mask: np.ndarray, detail) -> pa.RecordBatch:
        batch, k = reject(batch, mask, name, detail)
        self.count(name, k)
        return batch

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        c = self.config
        n = batch.num_rows
        prompt = batch.column("prompt")
        response = batch.column("response")
        rs = text_stats(response, ascii_path=not self.reference)
        ps = text_stats(prompt, ascii_path=not self.reference)
        batch = self._add_signals(batch, rs, "")
        if c.prompt_signals:
            batch = self._add_signals(batch, ps, "prompt_")
        self.count("rows", n)
        if not c.enabled or n == 0:
            return batch
        live = kept_mask(batch)
        if not live.any():
            return batch
        fmt = batch.column("format")
        is_cls = pc.equal(fmt, "classification").to_numpy(zero_copy_only=False)
        is_text = pc.equal(fmt, "text").to_numpy(zero_copy_only=False)
        is_sft = ~is_cls  # model answers: refusal and truncated apply (not to a tweet or a review)
        has_prompt = is_sft & ~is_text  # instruction rows: prompt rules apply

        # ``live``: the rows still kept. Each rule is evaluated on those only: reject() touches no other row, and
        # the rows a rule rejects leave ``live`` for the next one.
        def apply(name: str, hit: np.ndarray, detail) -> None:
            nonlocal batch, live
            hit = hit & live
            batch = self._apply(batch, name, hit, detail(hit) if callable(detail) and hit.any() else detail)
            live = live & ~hit

        split = not self.reference and bool(self._split)
        resp_lits = contains_literals(response, self._literals, live) if split else np.zeros(n, np.uint64)

        def exempt(hit: np.ndarray, regex: str) -> np.ndarray:
            """``hit`` less the instruction rows whose prompt matches ``regex`` or contains the whole response (ASCII
            case and spacing aside): 'Convert "SOS" to Morse code' -> "···––––···", 'Write "la la la"'."""
            cand = hit & has_prompt
            if not cand.any():
                return hit
            out = _regex(prompt, regex, cand) if regex else np.zeros(n, dtype=bool)
            rest = cand & ~out
            if rest.any():
                out |= contains_prompt(prompt, response, rest) > 0  # the prompt contains the response
            return hit & ~out

        # the short-text junk rules, on every format's response (the text of text and classification rows)
        js = None
        if c.no_content or c.repeated_words or c.random_letters:
            js = junk_stats(response, live, c.repeated_max_unit_words)
        if c.no_content:
            hit = exempt(live & (rs["n_chars"] > 0) & (js["n_content"] == 0), c.no_content_exempt_regex)
            detail = lambda rows: _join(("no letter, number or symbol in ", rs["n_chars"], " characters"), rows)
            apply("no_content", hit, detail)

        if c.placeholder:
            hit = self._search(response, c.placeholder_regex, live, resp_lits)
            apply("placeholder", hit, lambda rows: _matched("", response, c.placeholder_regex, rows))

        if c.repeated_words:
            unit, words = js["rep_unit"], js["rep_words"]
            repeats = words / np.maximum(unit, 1)
            hit = exempt(live & (unit > 0) & (repeats >= c.repeated_min_repeats), c.repeated_exempt_regex)
            detail = lambda rows: _join(("unit_words=", unit, ", repeats=", np.round(repeats, 2),
                                         f" >= {c.repeated_min_repeats:g}"), rows)  # fmt: skip
            apply("repeated_words", hit, detail)

        if c.random_letters:
            bigrams, rare, letters = js["latin_bigrams"], js["rare_bigrams"], js["latin_letters"]
            mean = js["bigram_score"] / np.maximum(bigrams, 1)
            hit = (live & (bigrams > 0) & (rare >= c.random_min_rare_bigrams) & (mean < c.random_max_mean_score)
                   & (letters >= c.random_min_latin_share * js["n_nonspace"]))  # fmt: skip
            hit = exempt(hit, c.random_exempt_regex)
            detail = lambda rows: _join(("mean_bigram_score=", np.round(mean, 2), f" < {c.random_max_mean_score:g}",
                                         " (rare_bigrams=", rare, " of ", bigrams, ")"), rows)  # fmt: skip
            apply("random_letters", hit, detail)

        if c.refusal:
            hit = self._search(response, c.refusal_regex, live & is_sft, resp_lits)
            if hit.any() and c.refusal_exempt_regex:
                hit &= ~_regex(prompt, c.refusal_exempt_regex, hit)
            if hit.any():
                apply("refusal", hit, lambda rows: _matched("", response, c.refusal_regex, rows))

        if c.repeats_prompt:
            share = ps["n_chars"] / np.maximum(rs["n_chars"], 1)
            todo = (
                live
                & has_prompt
                & (ps["n_words"] >= c.repeats_prompt_min_words)
                & (share >= c.repeats_prompt_min_share)
            )
            rel = contains_prompt(response, prompt, todo) if todo.any() else np.zeros(n, np.int8)
            hit = todo & (rel > 0)
            detail = lambda rows: pc.if_else(pa.array(rel == 2),
                                             pa.scalar("response equals the prompt (case, spacing aside)", STR),
                                             pa.scalar("response contains the whole prompt", STR))  # fmt: skip
            apply("repeats_prompt", hit, detail)

        if c.truncated:
            rule = _Rule(n)
            rows = live & is_sft
            fences = rs["n_code_fences"]
            odd = rows & (fences % 2 == 1)
            if odd.any():
                rule.add(
                    odd,
                    pc.binary_join_element_wise(
                        pa.scalar("unclosed code block: n_code_fences=", STR),
                        pc.cast(pa.array(fences), STR),
                        pa.scalar("", STR),
                    ),
                )
            # The rules match the last 300 characters. TRUNCATED_END/WORD_REGEX end in $ and span at most 9
            # characters, so they match there exactly when they match the whole text (RE2 runs a $-anchored pattern
            # backwards from the end: 0.3 ms a batch, where cutting every tail took 7); TRUNCATED_LONG_REGEX spans
            # more, and runs on the tails of the rows that end as it requires ("," "，" "..." "…").
            nw = rs["n_words"]
            long_rows = rows & (nw >= c.truncated_long_min_words)
            if self.reference:
                tail = pc.utf8_slice_codeunits(response, -300)
                end_hit = _regex(tail, TRUNCATED_END_REGEX, rows)
                word_hit = _regex(tail, TRUNCATED_WORD_REGEX, rows & (nw >= c.truncated_min_words))
                long_hit = _regex(tail, TRUNCATED_LONG_REGEX, long_rows)
            else:
                end_hit = _regex(response, TRUNCATED_END_REGEX, rows)
                word_hit = _regex(response, TRUNCATED_WORD_REGEX, rows & (nw >= c.truncated_min_words))
                if long_rows.any():
                    ending = pc.ends_with(response, ",")
                    for suffix in ("，", "...", "…"):
                        ending = pc.or_(ending, pc.ends_with(response, suffix))
                    long_rows &= pc.fill_null(ending, False).to_numpy(zero_copy_only=False)
                long_hit = np.zeros(n, dtype=bool)
                if long_rows.any():
                    idx = np.flatnonzero(long_rows)
                    tail = pc.utf8_slice_codeunits(response.take(pa.array(idx)), -300)
                    long_hit[idx] = pc.fill_null(pc.match_substring_regex(tail, TRUNCATED_LONG_REGEX), False).to_numpy(
                        zero_copy_only=False
                    )

            def ends(rows: np.ndarray) -> pa.Array:
                idx = np.flatnonzero(rows)
                last = pc.utf8_slice_codeunits(response.take(pa.array(idx)), -30)
                return _scatter(pc.binary_join_element_wise(pa.scalar("ends with '", STR), last, pa.scalar("'", STR),
                                                            pa.scalar("", STR)), idx, n)  # fmt: skip

            rule.add(end_hit, ends)
            rule.add(word_hit, ends)
            rule.add(long_hit, ends)
            apply("truncated", rule.mask, rule.detail)

        if c.script_mismatch:
            pl_, rl = ps["script_letters"], rs["script_letters"]
            p_tot = pl_.sum(1)
            r_tot = rl.sum(1)
            p_dom = ps["script"].astype(np.int64)
            r_dom = rs["script"].astype(np.int64)
            idx = np.arange(n)
            p_has_r = pl_[idx, r_dom]  # letters of the response's script in the prompt
            r_has_p = rl[idx, p_dom] / np.maximum(r_tot, 1)  # share of the prompt's script in the response
            cand = (live & has_prompt & (p_tot >= c.script_min_letters) & (r_tot >= c.script_min_letters)
                    & (p_dom != r_dom) & (r_dom != _LATIN) & (p_has_r <= c.script_prompt_max_letters)
                    & (r_has_p < c.script_max_shared_response))  # fmt: skip
            if cand.any():
                cand &= ~_regex(prompt, c.translation_regex, cand)
            detail = lambda rows: pc.binary_join_element_wise(
                pa.scalar("prompt ", STR), pc.take(_SCRIPT_NAMES, pa.array(p_dom)), pa.scalar(", response ", STR),
                pc.take(_SCRIPT_NAMES, pa.array(r_dom)), pa.scalar("", STR))  # fmt: skip
            apply("script_mismatch", cand, detail)

        # Gopher rules on the response (every format's content), plus the prompt's repetition for instruction rows
        # when asked.
        rule = _Rule(n)
        self._repetition(rule, rs, live, "")
        if c.judge_prompt_repetition:
            self._repetition(rule, ps, live & has_prompt, "prompt.")
        apply("gopher_repetition", rule.mask, rule.detail)

        rule = _Rule(n)
        self._quality(rule, rs, live, "")
        apply("gopher_quality", rule.mask, rule.detail)
        return batch
