import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.normalize import normalize, normalize_reference

CASES = [
    "plain ascii",
    "  leading and trailing  \n\n",
    "Caf\u0065\u0301 cr\u00e8me",  # NFC composes e + combining acute
    "a\r\nb\rc\r\r\nd",
    "tabs\t \nkept\tinside",
    "x\u00a0y\u2003z\u202fw\u205fv\u3000u",  # odd spaces -> " ", ideographic space kept
    "zero\u200bwidth\ufeffbom\u00adsoft",
    "ctl\x00\x07\x1b\x7f\x85end",
    "para1\n\n\n\n\npara2 \n \n \n para3",
    "    def f():\n        return 1\n",
    "\u4e2d\u6587\u3000\u6587\u672c\uff0c\u6ca1\u6709\u7a7a\u683c",
    "",
    " \n\t ",
    "emoji \U0001f469\u200d\U0001f4bb kept",
]


def test_kernel_matches_reference_on_cases():
    got = normalize(pa.array(CASES, pa.large_string())).to_pylist()
    assert got == [normalize_reference(c) for c in CASES]
    assert got[2] == "Caf\u00e9 cr\u00e8me" and got[5] == "x y z w v\u3000u" and got[9] == "def f():\n        return 1"


def test_nulls_slices_and_forms():
    arr = pa.array(["a\u00a0b", None, " c "], pa.string())
    assert normalize(arr).to_pylist() == ["a b", None, "c"]
    assert normalize(arr.slice(1)).to_pylist() == [None, "c"]
    assert normalize(pa.array(["\ufb01"], pa.large_string()), "NFKC").to_pylist() == ["fi"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.text(
            alphabet=st.sampled_from(
                list(
                    "ab \t\n\r\x00\x85\u00a0\u200b\ufeff\u00ad\u2002\u0301e\u4e2d"
                    "\u1100\u1161\u11a8\u212b\u0327\u00e9\U0001f600\u0915\u093c"
                )
            ),
            max_size=30,
        ),
        min_size=1,
        max_size=20,
    )
)
def test_kernel_matches_reference_property(texts):
    assert normalize(pa.array(texts, pa.large_string())).to_pylist() == [normalize_reference(t) for t in texts]
