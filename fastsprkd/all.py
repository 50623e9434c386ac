"Everything public in fastsprkd, in the style of `from fastai.vision.all import *`."
from .data import *
from .models import *
from .core import *
from .eigen import *
from .saddle import *
from .kfac import *
from .estimators import *
from .stability import *
from .analysis import *
from .callback.core import *
from .callback.sprkd import *
from .callback.observe import *
from .interpret import *
from .experiment import (StoryConfig, Story, run_story, run_demo, run_experiment, train_teacher, train_student,
                         evaluate_student, evaluation_probe, write_demo_report, summarize, paired_test, experiment_markdown,
                         ARMS, Task, make_task, describe_model, sprkd_events, comparisons, answer_sentences)
