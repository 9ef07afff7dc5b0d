import json

import pytest

from diffusers_quant import Plan, Spec, SpecError


@pytest.mark.parametrize(
    "text",
    [
        "bnb:nf4",
        "bnb:int8?threshold=0",
        "quanto:qint4?exclude=*proj_out*|*norm*",
        "quanto:qfloat8",
        "bnb:fp4?blocksize=128&double_quant=false",
    ],
)
def test_spec_round_trips_through_string_and_json(text):
    spec = Spec.parse(text)
    assert Spec.parse(str(spec)) == spec
    assert Spec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_spec_normalizes_aliases_and_sorts_options():
    assert Spec.parse("quanto:int8") == Spec("quanto", "qint8")
    a = Spec.parse("bnb:nf4?double_quant=false&blocksize=128")
    b = Spec.parse("bnb:nf4?blocksize=128&double_quant=false")
    assert a == b and str(a) == "bnb:nf4?blocksize=128&double_quant=false"
    assert Spec.parse("quanto:qint4?exclude=a|b").patterns("exclude") == ("a", "b")


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(SpecError, match=r"unknown backend 'bnbb'; expected one of bnb, .*quanto"):
        Spec.parse("bnbb:nf4")


def test_unknown_qtype_lists_the_backends_qtypes():
    with pytest.raises(
        SpecError, match=r"unknown qtype 'nf3' for backend 'bnb'; expected one of fp4, int8, nf4"
    ):
        Spec.parse("bnb:nf3")
    with pytest.raises(SpecError, match=r"qfloat8, qint2, qint4, qint8"):
        Spec.parse("quanto:int3")


def test_unknown_option_and_malformed_spec():
    with pytest.raises(SpecError, match=r"unknown option 'group' for backend 'quanto'; expected one of"):
        Spec.parse("quanto:qint4?group=32")
    with pytest.raises(SpecError, match=r"expected 'backend:qtype'"):
        Spec.parse("nf4")


def test_plan_parses_entries_and_settings_and_round_trips():
    plan = Plan.parse(
        "transformer=bnb:nf4,text_encoder_2=quanto:qint8,vae=none;mode=on-load;offload=model;dtype=bf16"
    )
    assert plan.mode == "on-load" and plan.offload == "model" and plan.dtype == "bfloat16"
    assert plan.spec_for("transformer", "transformer") == Spec("bnb", "nf4")
    assert plan.spec_for("text_encoder_2", "text_encoder") == Spec("quanto", "qint8")
    assert plan.spec_for("vae", "vae") is None
    assert plan.spec_for("text_encoder", "text_encoder") is None
    assert Plan.parse(str(plan)) == plan
    assert Plan.from_json(plan.to_json()) == plan


def test_plan_patterns_kinds_and_groups():
    plan = Plan.parse("text_encoder*=quanto:qint8,model=bnb:int8")
    assert plan.spec_for("text_encoder_3", "text_encoder") == Spec("quanto", "qint8")
    assert plan.spec_for("unet", "unet") == Spec("bnb", "int8")
    assert plan.spec_for("transformer", "transformer") == Spec("bnb", "int8")
    assert plan.spec_for("vae", "vae") is None
    # a model loaded on its own: a kind word matches it by kind whatever its folder is called
    assert Plan.parse("text_encoder=bnb:nf4").spec_for("t5", "text_encoder") == Spec("bnb", "nf4")
    # first matching entry wins
    first = Plan.parse("text_encoder_2=none,text_encoder*=bnb:nf4")
    assert first.spec_for("text_encoder_2", "text_encoder") is None
    assert first.spec_for("text_encoder", "text_encoder") == Spec("bnb", "nf4")


def test_in_a_pipeline_an_exact_name_selects_that_component_only():
    plan = Plan.parse("text_encoder=bnb:nf4,transformer=quanto:qint8")
    assert plan.spec_for("text_encoder", "text_encoder", pipeline=True) == Spec("bnb", "nf4")
    assert plan.spec_for("text_encoder_2", "text_encoder", pipeline=True) is None
    assert plan.spec_for("transformer_2", "transformer", pipeline=True) is None
    # outside a pipeline load the same component, loaded on its own, is selected by its kind
    assert plan.spec_for("text_encoder_2", "text_encoder", pipeline=False) == Spec("bnb", "nf4")
    assert plan.spec_for("text_encoder_2", "text_encoder") == Spec("bnb", "nf4")  # no pipeline load running


def test_groups_select_by_kind_in_pipelines_too():
    plan = Plan.parse("text_encoders=quanto:qint8,model=bnb:nf4")
    for name in ("text_encoder", "text_encoder_2", "t5"):
        assert plan.spec_for(name, "text_encoder", pipeline=True) == Spec("quanto", "qint8")
    assert plan.spec_for("transformer_2", "transformer", pipeline=True) == Spec("bnb", "nf4")
    assert plan.spec_for("prior", "unet", pipeline=True) == Spec("bnb", "nf4")
    assert plan.spec_for("vae", "vae", pipeline=True) is None


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "transformer=bnb:nf4;ofload=model",
            r"^unknown setting 'ofload'; expected one of mode, offload, device, dtype, gpu_memory, max_memory, "
            r"group_type, group_blocks, stream, record_stream, low_cpu_mem_usage, compute; "
            r"did you mean 'offload'\?$",
        ),
        ("transformer=bnb:nf4,devic=cuda", r"^unknown setting 'devic'; .* did you mean 'device'\?$"),
        (
            "transformer=bnb:nf4;precision=fp16",
            r"^unknown setting 'precision'; expected one of mode, offload",
        ),
        ("transformer=nf4", r"bad spec 'nf4'; expected 'backend:qtype'"),
        ("transformer=bnb:nf4;gpu_memory=0", r"gpu_memory=0; expected a positive number of GiB"),
    ],
)
def test_misspelt_settings_are_named_as_settings(text, message):
    with pytest.raises(SpecError, match=message):
        Plan.parse(text)


@pytest.mark.parametrize(
    "text,message",
    [
        ("transformer", r"bad plan item 'transformer'; expected 'component=backend:qtype'"),
        ("transformer=bnb:nf4;mode=fast", r"unknown mode 'fast'; expected one of auto, on-load, post-load"),
        (
            "transformer=bnb:nf4;offload=disk",
            r"unknown offload 'disk'; expected one of balanced, group, model, none",
        ),
        ("transformer=bnb:nf4;dtype=fp8", r"unknown dtype 'fp8'; expected one of bfloat16, float16, float32"),
    ],
)
def test_bad_plans_name_the_choices(text, message):
    with pytest.raises(SpecError, match=message):
        Plan.parse(text)


def test_plan_coerce_accepts_mapping():
    plan = Plan.coerce({"unet": "quanto:qint8", "text_encoder": None})
    assert plan.spec_for("unet", "unet") == Spec("quanto", "qint8")


def test_seeded_random_plans_parse_and_round_trip_or_name_the_problem():
    """Strings built from the grammar's own pieces (and some that are not): each parses to a Plan that
    prints back to itself, or is refused with SpecError; nothing else comes out."""
    import random

    from diffusers_quant.errors import SpecError

    pieces = [
        "transformer", "unet", "text_encoder_2", "vae", "*", "=", ":", ";", ",", "|", " ", "bnb", "nf4",
        "quanto", "qint4", "nncf", "int8_sym", "gguf", "q4_0", "none", "offload", "balanced", "group",
        "model", "gpu_memory", "max_memory", "gpu", "cpu", "8", "0", "-1", "inf", "1e309", "mode", "on-load",
        "device", "cuda", "dtype", "bf16", "stream", "true", "maybe", "group_blocks", "\u00e9", "\x00", "[",
        "transformer=bnb:nf4", "unet=quanto:qint4", ",vae=none", ";offload=balanced", ";gpu_memory=8",
        ";device=cuda", ";mode=post-load",
    ]  # fmt: skip
    rng = random.Random(0)
    parsed = 0
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        try:
            plan = Plan.parse(text)
        except SpecError as e:
            assert str(e), text
            continue
        parsed += 1
        assert Plan.parse(str(plan)) == plan, text
    assert parsed > 20  # the generator does reach valid plans


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "transformer=quanto:qint8?min_features=abc",
            r"option min_features='abc' .*expected a whole number >= 1",
        ),
        ("transformer=bnb:nf4?blocksize=7", r"option blocksize='7' .*expected one of 64, 128, 256"),
        ("transformer=bnb:nf4?double_quant=maybe", r"option double_quant='maybe' .*expected true or false"),
        ("transformer=bnb:int8?threshold=-1", r"option threshold='-1' .*expected a number >= 0"),
        ("transformer=bnb:nf4?compute_dtype=fp8", r"unknown dtype 'fp8'"),
        ("transformer=nncf:int4?group_size=0", r"option group_size='0' .*expected a positive integer or -1"),
        ("transformer=bnb:nf4?backend=x", r"unknown option 'backend' for backend 'bnb'"),
        ("transformer=bnb:nf4?qtype=x", r"unknown option 'qtype' for backend 'bnb'"),
        (
            "transformer=bnb:nf4;device=CPU",
            r"device='CPU'; expected cpu, cuda or cuda:N; did you mean 'cpu'\?",
        ),
        ("transformer=bnb:nf4;device=gpu0", r"device='gpu0'; expected cpu, cuda or cuda:N"),
    ],
)
def test_option_values_and_devices_are_checked_when_the_plan_is_parsed(text, message):
    """Issue 14, finding 3: these passed `check` and failed mid-load with raw errors."""
    with pytest.raises(SpecError, match=message):
        Plan.parse(text)


def test_a_plan_mapping_needs_string_keys():
    with pytest.raises(SpecError, match=r"plan keys must be component names or patterns \(strings\), not 1"):
        Plan.coerce({1: "bnb:nf4"})
    assert Plan.coerce({"transformer": "bnb:nf4?blocksize=128"}).entries[0][1].option("blocksize") == "128"
