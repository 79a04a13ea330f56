"""Which emoji are kept, the group that keeps look-alikes in one split, and the captions built from CLDR's English.

The rules are documented on `EmojiRules`, `select_emoji`, `group_key` and `build_captions`, and in docs/data.md.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from vsectl.data.emoji.catalog import VS16, Annotation, EmojiEntry
from vsectl.data.openclipart.cleaning import group_key as text_key

ZWJ = "\u200d"
SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))  # Fitzpatrick modifiers
HAIR = frozenset(chr(c) for c in range(0x1F9B0, 0x1F9B4))  # red, curly, bald, white hair components
GENDER_SIGNS = frozenset("\u2640\u2642")
PERSON = "\U0001F9D1"
CHILD = "\U0001F9D2"
OLDER = "\U0001F9D3"
# Gendered forms of one picture, mapped to the neutral person that the group key uses.
SAME_PERSON = {"\U0001F468": PERSON, "\U0001F469": PERSON, "\U0001F466": CHILD, "\U0001F467": CHILD,
               "\U0001F474": OLDER, "\U0001F475": OLDER, "\U0001F934": "\U0001FAC5", "\U0001F478": "\U0001FAC5",
               "\U0001F57A": "\U0001F483", "\U0001F936": "\U0001F385", "\U0001F9D4": PERSON}
# Single code points that draw the same scene as a ZWJ sequence of people.
SAME_SCENE = {"\U0001F48F": PERSON + "\u2764\U0001F48B" + PERSON, "\U0001F491": PERSON + "\u2764" + PERSON,
              "\U0001F46B": PERSON + "\U0001F91D" + PERSON, "\U0001F46C": PERSON + "\U0001F91D" + PERSON,
              "\U0001F46D": PERSON + "\U0001F91D" + PERSON}
FAMILY_MEMBERS = frozenset({PERSON, CHILD, "\U0001F476"})
DEFAULT_EXCLUDE = ("country-flag", "subdivision-flag")  # 261 flags (Emoji 15.0) named only by a country or region


@dataclass
class EmojiRules:
    """Rule parameters of the emoji cleaning (recorded in the manifest)."""

    skin_tones: bool = False  # keep the skin-tone variants (the same picture recoloured; same split as the base)
    exclude_subgroups: tuple[str, ...] = DEFAULT_EXCLUDE  # emoji-test.txt subgroups skipped entirely
    max_keywords: int = 3  # keywords in the name + keywords caption
    keyword_caption: bool = True  # a third caption made of keywords only ("An emoji with keywords ...")
    split_seed: int = 0


@dataclass
class EmojiItem:
    """A kept emoji: its sequence, CLDR name, captions and the key that groups it for splitting."""

    entry: EmojiEntry
    name: str
    keywords: list[str]
    captions: list[str]
    group: str
    filename: str = ""


def group_key(seq: str) -> str:
    """The picture a sequence shows, up to skin tone, hair, gender and age: look-alikes share one split.

    Drops U+FE0F, skin-tone modifiers, hair components and the gender signs, joins nothing (ZWJs removed), maps man,
    woman, boy, girl, old man and old woman (and prince/princess, the two dancers, Mrs./Mr. Claus) to one form, the
    couple and kiss code points to their people sequences, and every family of people and children to "family".
    """
    seq = SAME_SCENE.get(seq.replace(VS16, ""), seq)
    kept = [SAME_PERSON.get(c, c) for c in seq if c not in SKIN_TONES | HAIR | GENDER_SIGNS and c not in (VS16, ZWJ)]
    if seq == "\U0001F46A" or (len(kept) >= 2 and set(kept) <= FAMILY_MEMBERS):
        return "family"
    return " ".join(f"{ord(c):X}" for c in kept) or seq


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def build_captions(name: str, keywords: list[str], max_keywords: int = 3, keyword_caption: bool = True) -> list[str]:
    """Up to three captions for one emoji.

    1. the CLDR name as a sentence: "Grinning face.";
    2. "<Name>, with keywords k1, k2 and k3." with up to `max_keywords` keywords that add a word to the name;
    3. when `keyword_caption`: "An emoji with keywords k1, k2, ..." with every keyword but the name itself (the only
       caption that does not hold the name), unless those keywords are only the name's words again ("kick
       scooter": kick, scooter); dropped later if another emoji has the same one.
    """
    captions = [_sentence(name)]
    name_words = set(text_key(name).split())
    extra = [k for k in keywords if not set(text_key(k).split()) <= name_words]
    if extra:
        captions.append(_sentence(f"{name}, with keywords {_join(extra[:max_keywords])}"))
    rest = [k for k in keywords if text_key(k) != text_key(name)]
    if keyword_caption and rest and not set(text_key(" ".join(rest)).split()) <= name_words:
        captions.append(_sentence(f"an emoji with keywords {_join(rest)}"))
    return captions


def select_emoji(entries: list[EmojiEntry], names: dict[str, Annotation], rules: EmojiRules
                 ) -> tuple[list[EmojiItem], dict[str, int]]:
    """Apply the rules and build captions; a caption text that more than one kept emoji would get is dropped.

    In order: not the Component group (skin-tone swatches and hair pieces alone); only fully-qualified sequences
    (each emoji once: the minimally- and unqualified spellings draw the same picture); not the excluded subgroups;
    no skin-tone modifier unless `rules.skin_tones`; a CLDR English name (emoji newer than the CLDR release have none).

    Returns:
        (kept items in emoji-test order, counts {"listed", "component", "not_fully_qualified", "excluded_subgroup",
        "skin_tone_variant", "no_cldr_name", "kept", "captions_ambiguous_dropped"}).
    """
    counts = Counter({"listed": len(entries), **{k: 0 for k in ("component", "not_fully_qualified",
                                                                "excluded_subgroup", "skin_tone_variant",
                                                                "no_cldr_name")}})
    items: list[EmojiItem] = []
    for e in entries:
        if e.group == "Component":
            counts["component"] += 1
            continue
        if e.status != "fully-qualified":
            counts["not_fully_qualified"] += 1
            continue
        if e.subgroup in rules.exclude_subgroups:
            counts["excluded_subgroup"] += 1
            continue
        if not rules.skin_tones and SKIN_TONES & set(e.seq):
            counts["skin_tone_variant"] += 1
            continue
        ann = names.get(e.seq.replace(VS16, ""))
        if ann is None or not ann.name:
            counts["no_cldr_name"] += 1
            continue
        captions = build_captions(ann.name, ann.keywords, rules.max_keywords, rules.keyword_caption)
        items.append(EmojiItem(entry=e, name=ann.name, keywords=ann.keywords, captions=captions,
                               group=group_key(e.seq)))
    counts["kept"] = len(items)
    counts["captions_ambiguous_dropped"] = drop_shared_captions(items)
    return items, dict(counts)


def drop_shared_captions(items: list[EmojiItem]) -> int:
    """Remove every caption whose text (case and spacing aside) belongs to more than one item; returns how many.

    An identical caption on two pictures has no right answer, and could sit in two splits.
    """
    def norm(text: str) -> str:
        return " ".join(text.casefold().split())

    owners = Counter(norm(c) for it in items for c in set(map(norm, it.captions)))
    dropped = 0
    for it in items:
        keep = [c for c in it.captions if owners[norm(c)] == 1]
        dropped += len(it.captions) - len(keep)
        it.captions = keep
    return dropped
